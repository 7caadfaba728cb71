"""The training loss as one linear cross-entropy that makes its own gradient in the forward pass.

transformers' causal-LM loss writes the logits, an fp32 log-softmax, its gradient and a fill
(what it costs: bench/RESULTS_GPU.md, the `loss` lever). Here the logits are
made once (one matmul), a Triton kernel turns each row into its loss and, in place, into the
softmax gradient (two passes over the row, online softmax), and the gradients of the hidden
states and the head's weight are two matmuls over that buffer. The backward pass only scales
them. Without a CUDA GPU the same op runs in plain torch (the reference the GPU test compares
against). Liger's fused linear cross-entropy does the same per chunk, but torch.compile on
torch 2.11 cannot trace it; this op is opaque to compile (a torch.library custom op), so the
compiled graph just calls it.
"""

from __future__ import annotations

import logging

import torch

from ..modeling import base_model

log = logging.getLogger("codex.train")

IGNORE = -100  # transformers' ignore index for labels
# The row kernel's (BLOCK, warps, second pass from the row's end): the fastest of those
# bench/bench_fused_ce.py tried on an H200 (bench/RESULTS_GPU.md, other kernels).
ROWS = (4096, 8, True)
# Causal LMs whose forward is `lm_head(model(...).last_hidden_state)` and whose loss is the plain
# shifted cross-entropy (no logit scaling or soft-capping), so the fused loss is the same loss.
MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None

if triton is not None:
    @triton.jit
    def _rows_kernel(x_ptr, y_ptr, loss_ptr, stride, n_cols, BLOCK: tl.constexpr,
                     REVERSE: tl.constexpr = False):
        """One program per row of logits x: loss = logsumexp(x) - x[y]; x becomes softmax(x) - onehot(y)
        in place (fp32 arithmetic); rows with y = IGNORE get loss 0 and gradient 0. REVERSE: the
        second pass walks the row from its end, where the first pass's latest reads may still be
        in L2."""
        row = tl.program_id(0).to(tl.int64)
        x_ptr += row * stride
        y = tl.load(y_ptr + row)
        cols = tl.arange(0, BLOCK)
        if y == -100:
            for i in range(0, n_cols, BLOCK):
                tl.store(x_ptr + i + cols, 0.0, mask=i + cols < n_cols)
            tl.store(loss_ptr + row, 0.0)
            return
        m = float("-inf")
        d = 0.0
        for i in range(0, n_cols, BLOCK):
            xb = tl.load(x_ptr + i + cols, mask=i + cols < n_cols, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(xb, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new), 0)
            m = m_new
        x_y = tl.load(x_ptr + y).to(tl.float32)
        tl.debug_barrier()  # every thread has read x[y] before any overwrites it
        last = tl.cdiv(n_cols, BLOCK) - 1
        for j in range(0, n_cols, BLOCK):
            offs = j + cols
            if REVERSE:
                offs = last * BLOCK - j + cols
            xb = tl.load(x_ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
            # softmax - 1 at the target in fp32, before rounding: near p = 1 it cancels.
            g = tl.exp(xb - m) / d - tl.where(offs == y, 1.0, 0.0)
            tl.store(x_ptr + offs, g.to(x_ptr.dtype.element_ty), mask=offs < n_cols)
        tl.store(loss_ptr + row, m + tl.log(d) - x_y)


def _rows_torch(logits: torch.Tensor, y: torch.Tensor):
    """(per-row loss, softmax - onehot in the logits' dtype), computed in fp32 or wider; what the
    kernel computes."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    lse = x.logsumexp(-1)
    keep = y != IGNORE
    target = x.gather(1, y.clamp(min=0)[:, None])[:, 0]
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == y[:, None]
    g = torch.where(keep[:, None], (x - lse[:, None]).exp() - hit.float(), 0)
    return torch.where(keep, lse - target, 0), g.to(logits.dtype)


@torch.library.custom_op("codex::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, triton_rows: bool = True,
                         weight_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed loss, d loss / d h, d loss / d w) of cross_entropy(h @ w.T, y, sum, ignore -100);
    h [N, D] and w [V, D] in the matmul dtype. `triton_rows`: the Triton kernel where it can run
    (not `kernel`: inductor passes that name itself, and the compiled call failed).
    weight_grad=False (a frozen head, as under LoRA): d loss / d w is left empty, a matmul saved."""
    logits = h @ w.t()
    if triton_rows and triton is not None and logits.is_cuda:
        loss = torch.empty(len(y), device=h.device, dtype=torch.float32)
        n, v = logits.shape
        block, warps, reverse = ROWS
        _rows_kernel[(n,)](logits, y, loss, logits.stride(0), v,
                           BLOCK=min(block, triton.next_power_of_2(v)), num_warps=warps, REVERSE=reverse)
    else:
        loss, logits = _rows_torch(logits, y)
    return loss.sum().float(), logits @ w, logits.t() @ h if weight_grad else w.new_empty(0)


@linear_cross_entropy.register_fake
def _(h, w, y, triton_rows=True, weight_grad=True):
    return (h.new_empty((), dtype=torch.float32), torch.empty_like(h),
            torch.empty_like(w) if weight_grad else w.new_empty(0))


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of h @ w.T against y with the gradients made in forward; the matmuls
    in the autocast dtype when autocast is on, the softmax in fp32."""

    @staticmethod
    def forward(ctx, h, w, y, triton_rows: bool = True):
        kind = h.device.type
        dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else h.dtype
        ctx.weight_grad = w.requires_grad
        total, gh, gw = linear_cross_entropy(h.to(dt), w.to(dt), y, triton_rows, ctx.weight_grad)
        ctx.save_for_backward(gh.to(h.dtype), gw.to(w.dtype))
        return total

    @staticmethod
    def backward(ctx, grad):
        gh, gw = ctx.saved_tensors
        return gh * grad, gw * grad if ctx.weight_grad else None, None, None


def applies(model) -> str | None:
    """Why the fused loss cannot stand in for `model`'s own, or None when it can."""
    base = base_model(model)
    name = type(base).__name__
    if name not in MODELS:
        return f"{name} is not one of {', '.join(MODELS)}"
    head = getattr(base, "lm_head", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "its lm_head is not a plain Linear without bias (e.g. LoRA on lm_head)"
    return None
