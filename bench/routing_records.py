"""Size and write/read time of routing records: 1M tokens x 4 MoE layers x top-2 of 8 experts.

    .venv/bin/python bench/routing_records.py [--tokens 1000000] [--layers 4]

Prints one JSON line; docs/performance.md records the numbers. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mmfm.report.records import RoutingRecords, load_records, save_records


def planted(tokens: int, layers: int, experts: int, top_k: int) -> RoutingRecords:
    rng = np.random.default_rng(0)
    experts_LNK = np.argsort(rng.random((layers, tokens, experts), dtype=np.float32),
                             axis=2)[:, :, :top_k]
    weights_LNK = rng.random((layers, tokens, top_k), dtype=np.float32)
    token_N = rng.integers(0, 8192, tokens, dtype=np.int32)
    return RoutingRecords(
        step=1000, num_experts=experts, top_k=top_k, layers_L=np.arange(layers),
        experts_LNK=experts_LNK, weights_LNK=weights_LNK, token_N=token_N,
        next_N=np.roll(token_N, -1), predicted_N=token_N,
        source_N=rng.integers(0, 3, tokens).astype(np.int16),
        modality_N=np.zeros(tokens, np.int8), row_N=np.arange(tokens, dtype=np.int32) // 256,
        sources=["code", "prose", "licenses"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    records = planted(args.tokens, args.layers, args.experts, args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "step_00001000.npz"
        started = time.perf_counter()
        save_records(records, path)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        load_records(path)
        read_s = time.perf_counter() - started
        size = path.stat().st_size
    print(json.dumps({"tokens": args.tokens, "layers": args.layers, "experts": args.experts,
                      "top_k": args.top_k, "mb": round(size / 1e6, 1),
                      "bytes_per_token_layer": round(size / args.tokens / args.layers, 2),
                      "write_s": round(write_s, 2), "read_s": round(read_s, 2)}))


if __name__ == "__main__":
    main()
