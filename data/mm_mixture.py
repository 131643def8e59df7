"""How the multimodal loader picks the source of its next document.

Three modes (`multimodal.mixture`):

* ``tokens`` (default): deterministic and balanced by tokens. The next document comes from
  the source whose share of the tokens drawn so far lags its weight the most (ties to the
  first source). After every document, each source's token count differs from
  ``weight_i / sum(weights) x tokens drawn`` by at most one document's length, so in every
  window of the stream, a batch in particular, source i supplies ``p_i x W ± 2 L`` of the W
  tokens (L: the longest document): the per-step tolerance.
  This keeps the image:text token ratio that modality expert groups are sized for, step by step.
* ``documents``: the same, counting documents instead of tokens (±1 document per source
  after every draw; token shares then vary with document lengths).
* ``sample``: each document from source i with probability p_i, independently (weights
  honoured only in expectation).

Skipped documents (bad samples) do not count, so the source that produced one is asked again.
"""

from __future__ import annotations

from collections.abc import Sequence

MIXTURE_MODES = ("tokens", "documents", "sample")


def balanced_pick(shares: Sequence[float], consumed: Sequence[float]) -> int:
    """The source with the largest deficit ``share_i x total - consumed_i`` (first on ties)."""
    total = sum(consumed)
    deficits = [share * total - used for share, used in zip(shares, consumed, strict=True)]
    return max(range(len(deficits)), key=lambda i: (deficits[i], -i))


def consumption(mode: str, doc_tokens: int) -> int:
    """What one drawn document adds to its source's count in a balanced mode."""
    return doc_tokens if mode == "tokens" else 1
