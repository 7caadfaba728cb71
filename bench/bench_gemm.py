"""The GPT-2-small step's matmul shapes alone, bf16 on one GPU: TFLOP/s per shape and operand
layout, to tell which of the step's GEMMs run below cuBLAS's speed and whether a layout or a
fused (concatenated) shape would run faster. Prints one line per case; --json writes them too.

    python bench/bench_gemm.py [--tokens 16384] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch


def timed(fn, reps: int) -> float:
    """Median milliseconds of `fn` over `reps` runs (CUDA events), after a warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemm.py: needs a CUDA GPU")
    m, bf = args.tokens, torch.bfloat16
    rows = []
    # (name, N out features, K in features): the Llama block's projections at width 768, and the
    # concatenated q/k/v and gate/up weights.
    for name, n, k in (("q|k|v|o", 768, 768), ("gate|up", 2048, 768), ("down", 768, 2048),
                       ("qkv", 2304, 768), ("gate+up", 4096, 768)):
        x = torch.randn(m, k, device="cuda", dtype=bf)
        w = torch.randn(n, k, device="cuda", dtype=bf)  # nn.Linear's layout
        wt = w.t().contiguous()  # the same weight stored transposed
        dy = torch.randn(m, n, device="cuda", dtype=bf)
        cases = {"fwd x@W.t()": lambda: x @ w.t(), "fwd x@Wt": lambda: x @ wt,
                 "dgrad dY@W": lambda: dy @ w, "dgrad dY@Wt.t()": lambda: dy @ wt.t(),
                 "wgrad dY.t()@x": lambda: dy.t() @ x, "wgrad (x.t()@dY).t()": lambda: (x.t() @ dy)}
        for case, fn in cases.items():
            ms = timed(fn, args.reps)
            tf = 2 * m * n * k / ms / 1e9
            rows.append({"shape": name, "m": m, "n": n, "k": k, "case": case, "ms": round(ms, 4),
                         "tflops": round(tf, 1)})
            print(f"{name:8} M={m} N={n:5} K={k:5} {case:22} {ms * 1000:8.1f} us {tf:6.1f} TFLOP/s",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
