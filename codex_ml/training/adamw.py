"""AdamW as one Triton kernel per param group that also writes the weights' bf16 copies.

torch's fused AdamW with a grad_scale (the engine's clip factor) reads parameter, gradient and
both moments and writes all four back, the unscaled gradient included (for GradScaler's users):
32 bytes a parameter, and the bf16 weight copies are then refreshed by another pass. Here one
kernel over all of a group's tensors (a table of their addresses, like torch's multi-tensor apply)
reads 16 bytes a parameter and writes 12, plus the bf16 copy where the weight has one
(transforms.py's bf16_weights): the same arithmetic as
torch's fused kernel in fp32 (torch mixes in fp64 scalars: the results agree to rounding).
(bench/bench_adamw.py; figures in bench/RESULTS_GPU.md, other kernels.)
The state is torch's AdamW's (exp_avg, exp_avg_sq, a float32 step tensor on the device), so
checkpoints move freely between the two. Anything else (CPU tensors, amsgrad, GradScaler's
found_inf, tensor lr, addresses not 16-byte aligned, no Triton) runs torch's own step and then
refreshes the copies.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's step
    triton = None

BLOCK = 4096  # elements a program: 16 a thread at 8 warps

if triton is not None:
    @triton.jit
    def _pointers(row, col, offs, dtype: tl.constexpr, BLOCK: tl.constexpr):
        """The pointers to elements `offs` of the tensor whose address is row[col]. The hints (every
        address is 16-byte aligned: the host checks) let Triton load and store 16 bytes at a time;
        without them every element is its own 4-byte load."""
        base = tl.load(row + col).to(tl.pointer_type(dtype))
        return tl.max_contiguous(tl.multiple_of(base + offs, [16]), [BLOCK])

    @triton.jit
    def _adamw_kernel(table, blocks, scale_ptr, lr, lr_wd, beta1, beta2, eps, log2_beta1, log2_beta2,
                      HAS_SCALE: tl.constexpr, FULL: tl.constexpr, BLOCK: tl.constexpr):
        """Program i updates BLOCK elements of tensor blocks[i, 0] from offset blocks[i, 1]; FULL:
        all of them exist (no masks, which would also cost the wide loads), else a tensor's tail."""
        pid = tl.program_id(0)
        t = tl.load(blocks + 2 * pid).to(tl.int64)
        offs = tl.multiple_of(tl.load(blocks + 2 * pid + 1).to(tl.int64), BLOCK) + tl.arange(0, BLOCK)
        row = table + t * 7  # param, grad, exp_avg, exp_avg_sq, bf16 copy (0: none), step, numel
        if FULL:
            mask, other = None, None
        else:
            mask, other = offs < tl.load(row + 6), 0.0
        step = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
        p_ptrs = _pointers(row, 0, offs, tl.float32, BLOCK)
        m_ptrs = _pointers(row, 2, offs, tl.float32, BLOCK)
        v_ptrs = _pointers(row, 3, offs, tl.float32, BLOCK)
        g = tl.load(_pointers(row, 1, offs, tl.float32, BLOCK), mask=mask, other=other)
        if HAS_SCALE:
            g = tl.div_rn(g, tl.load(scale_ptr))
        p = tl.load(p_ptrs, mask=mask, other=other)
        m = tl.load(m_ptrs, mask=mask, other=other)
        v = tl.load(v_ptrs, mask=mask, other=other)
        p = p - lr_wd * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        # IEEE-rounded sqrt and division (Triton's plain ones are approximate), as torch's CUDA code.
        bias1 = 1 - tl.exp2(step * log2_beta1)
        bias2_sqrt = tl.sqrt_rn(1 - tl.exp2(step * log2_beta2))
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        p = p - tl.div_rn(tl.div_rn(lr, bias1) * m, denom)
        tl.store(p_ptrs, p, mask=mask)
        tl.store(m_ptrs, m, mask=mask)
        tl.store(v_ptrs, v, mask=mask)
        if tl.load(row + 4) != 0:
            tl.store(_pointers(row, 4, offs, tl.bfloat16, BLOCK), p.to(tl.bfloat16), mask=mask)


class AdamW16(torch.optim.AdamW):
    """torch.optim.AdamW whose step, on CUDA fp32 parameters, is one Triton kernel per param group
    (see the module's docstring), and which keeps `copies` (parameter -> its bf16 copy, a
    contiguous tensor of the same shape) equal to the parameters rounded to bf16 after each step."""

    def __init__(self, params, copies: dict | None = None, **kw):
        super().__init__(params, **kw)
        self.copies = copies or {}
        # param group index -> (the addresses it was built from, table, blocks, number of full blocks)
        self._tables = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(i, g) for i, g in enumerate(self.param_groups)]
        if any(plan is False for plan in plans):
            super().step()
            refresh_copies(self.copies)
            return loss
        scale = getattr(self, "grad_scale", None)
        for group, plan in zip(self.param_groups, plans):
            if plan is None:  # no gradients in this group
                continue
            steps, table, blocks, full = plan
            torch._foreach_add_(steps, 1)
            lr, wd, (b1, b2) = group["lr"], group["weight_decay"], group["betas"]
            for part, is_full in ((blocks[:2 * full], True), (blocks[2 * full:], False)):
                if len(part):
                    _adamw_kernel[(len(part) // 2,)](
                        table, part, table if scale is None else scale, lr, lr * wd, b1, b2, group["eps"],
                        math.log2(b1), math.log2(b2), HAS_SCALE=scale is not None, FULL=is_full,
                        BLOCK=BLOCK, num_warps=8)
        return loss

    def _plan(self, i: int, group):
        """(step tensors, address table, block list: the full blocks first, their number) for group
        i's kernel; None: no gradients; False: the kernel cannot run it. The table is rebuilt (and
        the tensors checked) only when an address changed: gradients may be new tensors each step,
        mostly at the same addresses."""
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return None
        if (triton is None or getattr(self, "found_inf", None) is not None or group["amsgrad"]
                or group["maximize"] or group["capturable"] or group["differentiable"]
                or torch.is_tensor(group["lr"])):
            return False
        for p in ps:
            if not self.state[p]:
                if not _plain(p, torch.float32):
                    return False
                self.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in ps]
        addrs = []
        for p, s in zip(ps, states):
            copy = self.copies.get(p)
            addrs += [p.data_ptr(), p.grad.data_ptr(), s["exp_avg"].data_ptr(), s["exp_avg_sq"].data_ptr(),
                      0 if copy is None else copy.data_ptr(), s["step"].data_ptr(), p.numel()]
        cached = self._tables.get(i)
        if cached is None or cached[0] != addrs:
            if not all(_plain(p, torch.float32) and _plain(p.grad, torch.float32)
                       and (p not in self.copies or _plain(self.copies[p], torch.bfloat16))
                       and all(_plain(t, torch.float32) for t in s.values()) for p, s in zip(ps, states)):
                return False
            if any(a % 16 for j, a in enumerate(addrs) if j % 7 < 5):  # the kernel's wide loads need it
                return False
            n = torch.tensor([p.numel() for p in ps])
            per = (n + BLOCK - 1) // BLOCK
            first = torch.repeat_interleave(per.cumsum(0) - per, per)
            t = torch.repeat_interleave(torch.arange(len(ps)), per)
            start = (torch.arange(int(per.sum())) - first) * BLOCK
            full = start + BLOCK <= n[t]
            pairs = torch.stack([t, start], 1)
            blocks = torch.cat([pairs[full], pairs[~full]])
            # From pinned memory without blocking: a pageable copy would wait for the GPU.
            dev = ps[0].device
            cached = (addrs, torch.tensor(addrs, dtype=torch.int64).pin_memory().to(dev, non_blocking=True),
                      blocks.int().flatten().pin_memory().to(dev, non_blocking=True), int(full.sum()))
            self._tables[i] = cached
        return [s["step"] for s in states], *cached[1:]


def _plain(t: torch.Tensor, dtype) -> bool:
    return t.is_cuda and t.dtype == dtype and t.is_contiguous()


def refresh_copies(copies: dict) -> None:
    """Each bf16 copy (parameter -> copy) set to its parameter rounded to bf16, in one kernel."""
    if copies:
        torch._foreach_copy_(list(copies.values()), [p.detach() for p in copies])
