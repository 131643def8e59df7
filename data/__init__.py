"""Text data path: readers -> default corpus -> BPE tokenizer -> WebDataset token shards ->
packed, checkpointable training loader. Import as ``mmfm.data``.

The public names below are loaded lazily (PEP 562), so ``import mmfm.data.cli`` (which every
``mmfm`` command does to build its parser) does not pull in torch or tokenizers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "corpus": ("PackageFetchError", "build_corpus", "build_default_corpus", "choose_holdout",
               "fetch_package", "holdout_score"),
    "loader": ("IGNORE_INDEX", "Batch", "TokenLoader", "iter_eval_batches"),
    "readers": ("Document", "ReadStats", "read_code_tree", "read_documents", "read_jsonl",
                "read_text_files"),
    "shards": ("iter_shard_docs", "read_index", "validate_key", "write_token_shards"),
    "tokenizer": ("EOS", "PAD", "SPECIAL_TOKENS", "encode_plain", "load_tokenizer",
                  "special_token_ids", "tokenizer_fingerprint", "train_tokenizer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)

def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mmfm.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmfm.data.{_WHERE[name]}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
