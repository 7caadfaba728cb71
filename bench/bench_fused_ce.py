"""The fused linear cross-entropy's row kernel (codex_ml/training/fused_ce.py) by block size,
warps and the direction of its second pass, and a one-pass variant that holds the row in
registers, each checked against the torch path; timed against transformers' path (bf16 logits,
fp32 cross-entropy, backward) on the same data, at the benchmark's shape: 16 x 1024 tokens, width
768, vocab 50,176. Prints ms per call, the ratio to transformers' path and the maximum error.
GPU only.

    python bench/bench_fused_ce.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from codex_ml.training import fused_ce  # noqa: E402

triton, tl = fused_ce.triton, getattr(fused_ce, "tl", None)  # None without Triton (CPU installs)


@(triton.jit if triton else lambda f: f)
def _one_pass_kernel(x_ptr, y_ptr, loss_ptr, stride, n_cols, BLOCK: tl.constexpr):
    """The row kernel reading its row once: the whole row (BLOCK >= n_cols) held in registers
    in bf16, so the logits cross HBM twice (read, write) instead of three times. An experiment:
    at 50k columns the row is 100 KB, more than one program's registers hold without spills."""
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * stride
    y = tl.load(y_ptr + row)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + cols, mask=cols < n_cols, other=float("-inf"))
    m = tl.max(x, 0).to(tl.float32)
    # exp2 here and exp below: two different expressions, so the compiler cannot keep the fp32
    # exponentials live across the reduction (that spilled more).
    d = tl.sum(tl.exp2((x.to(tl.float32) - m) * 1.4426950408889634), 0)
    x_y = tl.load(x_ptr + y).to(tl.float32)
    tl.debug_barrier()
    g = tl.exp(x.to(tl.float32) - m) / d - tl.where(cols == y, 1.0, 0.0)
    tl.store(x_ptr + cols, g.to(x_ptr.dtype.element_ty), mask=cols < n_cols)
    tl.store(loss_ptr + row, m + tl.log(d) - x_y)


def ms(fn, n=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def main():
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("bench_fused_ce.py: needs a CUDA GPU")
    torch.manual_seed(0)
    n, d, v = 16 * 1024, 768, 50176
    h = torch.randn(n, d, device="cuda").bfloat16()
    w = (torch.randn(v, d, device="cuda") * 0.05).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda")
    logits = h @ w.t()

    def model_path():
        x = logits.detach().requires_grad_(True)
        torch.nn.functional.cross_entropy(x.float(), y, reduction="sum").backward()

    base = ms(model_path)
    print(f"transformers' path (fp32 cross-entropy + backward on bf16 logits): {base:.3f} ms")
    loss = torch.empty(n, device="cuda")
    want_loss, want_grad = fused_ce._rows_torch(logits, y)
    configs = [(fused_ce._rows_kernel, dict(BLOCK=b, num_warps=w, REVERSE=r), f"BLOCK {b:6d} warps {w:2d}"
                f"{' second pass reversed' if r else ''}")
               for b, w in [(32768, 32), (16384, 16), (16384, 32), (8192, 16), (8192, 32), (8192, 8),
                            (4096, 8), (4096, 16), (2048, 4)] for r in (False, True)]
    configs += [(_one_pass_kernel, dict(BLOCK=triton.next_power_of_2(v), num_warps=w), f"one pass, warps {w}")
                for w in (16, 32)]
    for kern, kw, name in configs:
        x = logits.clone()
        kern[(n,)](x, y, loss, x.stride(0), v, **kw)
        err = max((loss - want_loss).abs().max().item() / want_loss.abs().max().item(),
                  (x.float() - want_grad.float()).abs().max().item())
        x = logits.clone()

        def kernel():
            kern[(n,)](x, y, loss, x.stride(0), v, **kw)
        t = ms(kernel)
        print(f"row kernel {name}: {t:.3f} ms  ({base / t:.2f}x); "
              f"{3 * logits.numel() * 2 / (t / 1e3) / 1e12:.1f} TB/s for 2 reads + 1 write; "
              f"max error {err:.1e}", flush=True)
    print(f"whole op: {ms(lambda: fused_ce.linear_cross_entropy(h, w, y)):.3f} ms")


if __name__ == "__main__":
    main()
