"""Shared fixtures: a small real text dataset (tokenizer + shards) built once per session from
text already on every Debian/Python machine: the license texts in /usr/share/common-licenses
and a slice of the Python standard library's source. Nothing here is written by us."""

from __future__ import annotations

import itertools
import sysconfig
from pathlib import Path

import pytest

from mmfm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")


def _real_documents(limit: int) -> list[dict]:
    from mmfm.data.readers import read_code_tree, read_text_files

    docs = []
    if LICENSES.is_dir():
        docs += list(read_text_files(LICENSES, source="licenses", extensions=None))
    stdlib = Path(sysconfig.get_paths()["stdlib"]) / "json"
    docs += list(itertools.islice(read_code_tree(stdlib, source="stdlib"), limit))
    email = Path(sysconfig.get_paths()["stdlib"]) / "email"
    docs += list(itertools.islice(read_code_tree(email, source="stdlib_email"), limit))
    return docs


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> dict[str, Path]:
    """{"tokenizer", "train", "val"} paths of a ~60-document real corpus, vocab 512."""
    from mmfm.data.shards import write_token_shards
    from mmfm.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("text_data")
    docs = _real_documents(limit=40)
    val = docs[::15]
    train = [d for i, d in enumerate(docs) if i % 15]
    tokenizer = root / "tokenizer.json"
    train_tokenizer((d["text"] for d in train), vocab_size=512, out_path=tokenizer)
    write_token_shards(train, tokenizer, root / "train", docs_per_shard=8)
    write_token_shards(val, tokenizer, root / "val", docs_per_shard=50)
    return {"tokenizer": tokenizer, "train": root / "train", "val": root / "val"}


def tiny_overrides(data: dict[str, Path], run_dir: Path, **extra) -> list[str]:
    """Overrides that shrink the tiny preset to a seconds-long CPU run on `text_data`."""
    values = {
        "run.out_dir": str(run_dir), "run.name": "t",
        "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.ffn_hidden": 128, "model.max_seq_len": 64,
        "model.moe.num_experts": 4, "model.moe.expert_hidden": 64,
        "data.train_shards": str(data["train"]), "data.val_shards": str(data["val"]),
        "data.tokenizer": str(data["tokenizer"]), "data.seq_len": 64,
        "train.micro_batch_size": 4, "train.steps": 6, "train.warmup_steps": 1,
        "train.eval_every": 3, "train.eval_batches": 2, "train.ckpt_every": 3, "train.log_every": 1,
        "train.precision": "fp32", "metrics.console": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def tiny_config(data: dict[str, Path], run_dir: Path, **extra):
    return load_config(ROOT / "configs" / "text_moe_tiny.yaml", tiny_overrides(data, run_dir, **extra))
