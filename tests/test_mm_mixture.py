"""Modality-balanced batches: with `mixture=tokens` every batch holds each source's weight
share of the tokens within the stated tolerance (2 documents' worth), on planted sources whose
tokens are told apart by their letters; random draws (`sample`) miss it."""

from __future__ import annotations

import numpy as np
import pytest
from test_mm_common import tiny_encoders

from mmfm.data.mm_loader import MMLoader
from mmfm.data.mm_mixture import balanced_pick
from mmfm.data.mm_shards import write_mm_shards
from mmfm.data.tokenizer import load_tokenizer
from mmfm.errors import UserValueError

WEIGHTS = {"a": 3.0, "z": 1.0}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, text_data):
    """Two text-only shard sets: documents of 'a...a' and of 'z...z', lengths 3..29 chars."""
    root = tmp_path_factory.mktemp("mixture")
    rng = np.random.default_rng(0)
    for letter in WEIGHTS:
        docs = [{"key": f"{letter}{i:04d}", "segments": [{"text": letter * int(rng.integers(3, 30))}]}
                for i in range(300)]
        write_mm_shards(docs, root / letter, max_samples=50)
    tok = load_tokenizer(text_data["tokenizer"])
    ids = {letter: {i for n in range(1, 31) for i in tok.encode(letter * n).ids} for letter in WEIGHTS}
    assert not ids["a"] & ids["z"]
    longest = max(len(tok.encode(letter * 29).ids) + 1 for letter in WEIGHTS)  # + <|endoftext|>
    return root, ids, longest


def _worst_share_error(planted, text_data, mixture: str, batches: int = 40) -> tuple[float, float]:
    """(largest |tokens of 'a' - p_a x W| over batches, the tolerance 2 L) in tokens."""
    root, ids, longest = planted
    loader = MMLoader([(k, root / k, w) for k, w in WEIGHTS.items()], text_data["tokenizer"],
                      128, 8, tiny_encoders(), shuffle_buffer=8, mixture=mixture)
    share = WEIGHTS["a"] / sum(WEIGHTS.values())
    worst = 0.0
    for _ in range(batches):
        tokens = next(loader).input_ids.flatten().tolist()
        a = sum(t in ids["a"] for t in tokens)
        z = sum(t in ids["z"] for t in tokens)
        worst = max(worst, abs(a - share * (a + z)))
    return worst, 2 * longest


def test_token_balanced_batches_hold_the_weights(planted, text_data):
    worst, tolerance = _worst_share_error(planted, text_data, "tokens")
    assert worst <= tolerance, (worst, tolerance)
    sampled, _ = _worst_share_error(planted, text_data, "sample")
    assert sampled > tolerance, "random draws miss the per-batch share (the planted check can fail)"


def test_balanced_pick_tracks_the_shares():
    consumed = [0, 0, 0]
    shares = [0.5, 0.3, 0.2]
    lengths = np.random.default_rng(1).integers(1, 50, size=3000)
    for n in lengths:
        s = balanced_pick(shares, consumed)
        consumed[s] += int(n)
        total = sum(consumed)
        assert all(abs(c - p * total) <= 50 for c, p in zip(consumed, shares, strict=True))


def test_unknown_mixture_is_refused(planted, text_data):
    root, _, _ = planted
    with pytest.raises(UserValueError, match="mixture='round' is not one of tokens, documents, sample"):
        MMLoader([("a", root / "a", 1.0)], text_data["tokenizer"], 64, 4, tiny_encoders(),
                 mixture="round")
