"""The fused linear cross-entropy's row kernel (codex_ml/training/fused_ce.py) by block size and
warps, against transformers' path (bf16 logits, fp32 cross-entropy, backward) on the same data,
at the benchmark's shape: 16 x 1024 tokens, width 768, vocab 50,176. Prints ms per call and the
ratio to the torch path. GPU only.

    python bench/bench_fused_ce.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from codex_ml.training import fused_ce  # noqa: E402


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
    if not torch.cuda.is_available():
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
    for block, warps in [(32768, 32), (16384, 16), (8192, 16), (8192, 8), (4096, 8), (4096, 4),
                         (2048, 4)]:
        x = logits.clone()

        def kernel():
            fused_ce._rows_kernel[(n,)](x, y, loss, x.stride(0), v, BLOCK=block, num_warps=warps)
        t = ms(kernel)
        print(f"row kernel BLOCK {block:6d} warps {warps:2d}: {t:.3f} ms  ({base / t:.2f}x); "
              f"{3 * logits.numel() * 2 / (t / 1e3) / 1e12:.1f} TB/s for 2 reads + 1 write")
    print(f"whole op: {ms(lambda: fused_ce.linear_cross_entropy(h, w, y)):.3f} ms")


if __name__ == "__main__":
    main()
