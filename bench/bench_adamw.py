"""The optimizer step alone on one GPU, GPT-2-small-sized Llama's parameters (123.5M, fp32): torch's
fused AdamW with a grad_scale (the engine's clip factor) followed by the bf16 weight copies'
refresh (what the engine ran up to session 11) against codex_ml's AdamW16 (one Triton kernel per
param group that writes the copies too), in the same run. Prints GPU ms a step (CUDA events over
steps issued back to back), the host's ms a step, the bandwidth that would take, and the ratio.

    python bench/bench_adamw.py [--steps 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml.training import adamw  # noqa: E402


def shapes(layers=12, width=768, inter=2048, vocab=50176):
    """(name, shape) of a Llama decoder's parameters, the embedding tied to the head."""
    out = [("embed", (vocab, width))]
    for i in range(layers):
        out += [(f"{i}.{n}_proj", (width, width)) for n in "qkvo"]
        out += [(f"{i}.gate_proj", (inter, width)), (f"{i}.up_proj", (inter, width)),
                (f"{i}.down_proj", (width, inter)), (f"{i}.norm1", (width,)), (f"{i}.norm2", (width,))]
    return out + [("norm", (width,))]


def run(kind: str, steps: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    named = [(n, torch.nn.Parameter(torch.randn(s, device="cuda", generator=g) * 0.02)) for n, s in shapes()]
    grads = [torch.randn(p.shape, device="cuda", generator=g) * 1e-3 for _, p in named]
    copies = {p: torch.empty_like(p, dtype=torch.bfloat16) for n, p in named if n.endswith("proj")}
    groups = [{"params": [p for _, p in named if p.dim() == 2], "weight_decay": 0.1},
              {"params": [p for _, p in named if p.dim() == 1], "weight_decay": 0.0}]
    kw = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    opt = adamw.AdamW16(groups, copies=copies, **kw) if kind == "adamw16" else torch.optim.AdamW(groups, **kw)
    opt.grad_scale = torch.tensor(1.5, device="cuda")

    def step():
        opt.step()
        if kind == "torch":
            adamw.refresh_copies(copies)

    # The same gradients before each of 10 steps (torch's kernel unscales them in place): the
    # weights the two must agree on.
    for _ in range(10):
        for (_, p), gr in zip(named, grads):
            p.grad = gr.clone()
        step()
    weights = torch.cat([p.detach().flatten() for _, p in named])
    # Timed: `steps` steps issued back to back (the host issues a step faster than the GPU runs
    # it, so the events time the GPU's work; the host's time is printed to show it).
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    a.record()
    for _ in range(steps):
        step()
    b.record()
    host = (time.perf_counter() - t0) * 1e3 / steps
    b.synchronize()
    ms = a.elapsed_time(b) / steps
    n = sum(p.numel() for _, p in named)
    n_copy = sum(p.numel() for p in copies)
    # Bytes the step must move at least: p, g, m, v read; p, m, v written; the copies written
    # (torch also writes the unscaled gradient back, and reads p again for the copies).
    need = 28 * n + 2 * n_copy
    return {"kind": kind, "params": n, "gpu_ms": round(ms, 4), "host_ms": round(host, 4),
            "tb_per_s_at_minimum_bytes": round(need / ms / 1e9, 2), "weights": weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_adamw.py: needs a CUDA GPU")
    rows = [run(kind, args.steps) for kind in ("torch", "adamw16", "torch", "adamw16")]
    diff = (rows[0]["weights"] - rows[1]["weights"]).abs().max().item()  # after 10 steps
    for r in rows:
        r.pop("weights")
        print(f"{r['kind']:8} {r['params'] / 1e6:.1f}M params  GPU {r['gpu_ms']:.3f} ms/step  "
              f"host {r['host_ms']:.3f} ms/step  {r['tb_per_s_at_minimum_bytes']} TB/s at the minimum bytes",
              flush=True)
    ratio = statistics.mean(r["gpu_ms"] for r in rows[0::2]) / statistics.mean(r["gpu_ms"] for r in rows[1::2])
    print(f"adamw16 vs torch fused AdamW + copy refresh: {ratio:.2f}x faster; max |weight difference| "
          f"after 10 steps: {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "speedup": round(ratio, 3), "max_weight_diff": diff}, f, indent=1)


if __name__ == "__main__":
    main()
