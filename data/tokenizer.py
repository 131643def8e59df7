"""Byte-level BPE tokenizer (Hugging Face `tokenizers`) with reserved special tokens.

Byte-level means every string is encodable (no unknown token) and decoding is lossless.
The special tokens get the first ids, in the order of `SPECIAL_TOKENS`, so their ids are
the same for every tokenizer we train:

* ``<|endoftext|>`` ends every document (the shard writer appends it); the loader packs
  documents back to back, separated by it.
* ``<|pad|>`` fills the tail of a validation row that has no more text.
* ``<|image|>``, ``<|audio|>`` and the ``*_start``/``*_end`` markers are placeholders for
  the multimodal path: encoder outputs are scattered into placeholder positions.

Text that happens to contain a special token's spelling (code or docs *about* tokenizers
do) must not turn into that token, or a document could fake a document boundary; use
:func:`encode_plain` for document text, which encodes such spellings as ordinary bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmfm.errors import UserValueError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IMAGE = "<|image|>"
AUDIO = "<|audio|>"
IMAGE_START = "<|image_start|>"
IMAGE_END = "<|image_end|>"
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
SPECIAL_TOKENS = (EOS, PAD, IMAGE, AUDIO, IMAGE_START, IMAGE_END, AUDIO_START, AUDIO_END)

_N_BYTES = 256  # the byte-level alphabet every vocabulary starts with
MIN_VOCAB_SIZE = _N_BYTES + len(SPECIAL_TOKENS)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | Path | None = None,
    *,
    min_frequency: int = 2,
    length: int | None = None,
) -> Tokenizer:
    """Train a byte-level BPE on `texts` (any iterator: it is streamed, not materialized).

    The vocabulary is at most `vocab_size` (fewer if the text has too few distinct merges);
    read the real size from ``tokenizer.get_vocab_size()``. Saved atomically to `out_path`
    when given. `length` (number of texts) only drives the progress estimate.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise UserValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, even ones absent from the training text, so nothing is unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    if out_path is not None:
        save_tokenizer(tok, out_path)
    return tok


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as tokenizer.json via a temp file + rename, so a crash never leaves half
    a file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json written by :func:`train_tokenizer`.

    Raises ValueError (one line, naming the path) if it is missing, unreadable, corrupt,
    or lacks our special tokens.
    """
    path = Path(path)
    if not path.is_file():
        raise UserValueError(f"tokenizer file not found: {path} (train one with `mmfm data tokenizer`)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserValueError(f"tokenizer file is corrupt or not a tokenizers JSON: {path} ({first})") from e
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise UserValueError(f"tokenizer {path} lacks the special tokens {missing}; retrain it "
                         "with `mmfm data tokenizer`")
    return tok


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """``{token string: id}`` for every reserved special token."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise UserValueError(f"tokenizer lacks the special tokens {missing}")
    return ids  # type: ignore[return-value]


def eos_id(tok: Tokenizer) -> int:
    return special_token_ids(tok)[EOS]


def pad_id(tok: Tokenizer) -> int:
    return special_token_ids(tok)[PAD]


def encode_plain(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of document texts, with special-token spellings encoded as plain text.

    Batched (the Rust side uses all cores). No EOS is added; the shard writer adds it.
    """
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True  # "<|endoftext|>" inside a text is just characters
    try:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = previous


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (vocab, merges, specials, pipeline).

    Shard indexes record it so training can tell when the shards were written with a
    different tokenizer than the one a model was trained with, even at equal vocab size.
    """
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
