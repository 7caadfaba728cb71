"""Gradient clipping as the fused AdamW's `grad_scale` (an undocumented attribute of torch's optimizers).

Torch's fused AdamW divides each gradient by `optimizer.grad_scale` as its kernel reads it: the
attribute GradScaler sets for fused optimizers, read by `torch.optim.AdamW.step`, not a documented
API. Written for torch 2.11-2.13; on another version `folds(opt)` is False for torch's optimizer
and the loop clips in place (clip_grads_with_norm_). adamw.AdamW16 reads the same attribute
itself (our own kernel), on any version.

Why: the clip becomes a divisor inside the optimizer's one pass over the gradients instead of a
pass that multiplies every gradient in place before the step. It can go when torch's clipping is
fused into its optimizers by itself.
"""

from __future__ import annotations

import torch

VERSIONS = ("2.11", "2.12", "2.13")


def folds(opt) -> bool:
    """Whether `opt` applies a grad_scale in its step."""
    from ..adamw import AdamW16

    if isinstance(opt, AdamW16):
        return True
    return (torch.__version__.startswith(VERSIONS) and isinstance(opt, torch.optim.AdamW)
            and bool(opt.defaults.get("fused")))


def clip(opt, norm: torch.Tensor, max_norm: float) -> None:
    """The step divides every gradient by max(1, norm / max_norm): clip_grad_norm_'s factor."""
    opt.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
