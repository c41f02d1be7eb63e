"""Would a lower-precision product make exact mining cheaper on this CPU? Times the mining product
(anchors × pool, 2000 × 22k × 512 by default) in every precision torch and numpy offer here.

    python benchmarks/probe_low_precision.py [--queries 2000] [--pool 22000] [--dim 512]

An exact search in low precision would take each anchor's short list from the cheap product and
re-rank it in float32; that pays only if the cheap product is well under the float32 one, by more than
its own top-k (timed last: faiss fuses that into its float32 search, here it is a pass of its own).
Each variant runs once to warm up, then `--repeats` times (best kept); a variant slower than `--give-up`
seconds on its warm-up is reported from that one call. Not part of `make bench` (it compares precisions,
not our approach with the reference). Writes runs/bench/low_precision.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def timed(call, repeats: int, give_up: float) -> tuple[float, int]:
    """(best seconds, calls timed) of `call`; one call only when the warm-up is already too slow."""
    started = time.perf_counter()
    call()
    first = time.perf_counter() - started
    if first > give_up:
        return first, 1
    best = first
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best, repeats


def variants(anchors: np.ndarray, pool: np.ndarray) -> dict:
    """name -> a call computing the (Q, P) product in that precision."""
    a32, p32 = torch.from_numpy(anchors), torch.from_numpy(pool)
    a16, p16 = a32.bfloat16(), p32.bfloat16()
    ah, ph = a32.half(), p32.half()
    found = {
        "numpy float32 (OpenBLAS)": lambda: anchors @ pool.T,
        "torch float32": lambda: a32 @ p32.T,
        "torch bfloat16": lambda: a16 @ p16.T,
        "torch float16": lambda: ah @ ph.T,
    }
    scale = 127.0 / max(float(np.abs(anchors).max()), float(np.abs(pool).max()))
    a8 = torch.from_numpy(np.round(anchors * scale).astype(np.int8))
    p8t = torch.from_numpy(np.ascontiguousarray(np.round(pool * scale).astype(np.int8).T))
    found["torch._int_mm int8 -> int32"] = lambda: torch._int_mm(a8, p8t)
    linear = torch.nn.Linear(pool.shape[1], pool.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(p32)
    with warnings.catch_warnings():  # torch.ao's deprecation notice: the kernel (FBGEMM) is what we time
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                           dtype=torch.qint8)
    found[f"dynamic int8 linear ({torch.backends.quantized.engine})"] = lambda: quantized(a32)
    scores = a32 @ p32.T
    found["(then) torch.topk k=64 of the scores"] = lambda: torch.topk(scores, 64, dim=1)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--pool", type=int, default=22_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--give-up", type=float, default=5.0, help="seconds; slower variants run once")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "low_precision.json"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    anchors = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    pool = rng.standard_normal((args.pool, args.dim)).astype(np.float32)
    anchors /= np.linalg.norm(anchors, axis=1, keepdims=True)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    results = {}
    with torch.no_grad():
        for name, call in variants(anchors, pool).items():
            try:
                seconds, calls = timed(call, args.repeats, args.give_up)
            except RuntimeError as err:  # a kernel this build lacks
                results[name] = {"error": str(err).splitlines()[0]}
                print(f"{name:<40} not available: {results[name]['error']}")
                continue
            results[name] = {"seconds": seconds, "calls": calls}
            print(f"{name:<40}{seconds:>9.3f} s"
                  + ("   (one call: too slow to repeat)" if calls == 1 else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"queries": args.queries, "pool": args.pool, "dim": args.dim,
                               "torch_threads": torch.get_num_threads(), "results": results},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
