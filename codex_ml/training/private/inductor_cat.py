"""Inductor lowers a wide last-dimension concatenation as slices its producers write (a private API).

Written for torch 2.11-2.13 (`torch._inductor.lowering.pointwise_cat`, `ir.ConcatKernel`,
`config.post_grad_custom_post_pass`); on any other version `available()` is False and the engine
does without it (fused_proj's auto then stays off: see transforms.py).

Why: the backward of a fused q/k/v (or gate/up) matmul concatenates the three output gradients
along the last dimension for one weight-gradient matmul. Inductor chose one pointwise kernel with a
masked load per input, which also recomputed RoPE's backward inside it, several times slower than
slices (bench/RESULTS_GPU.md, the fused_proj row). Inductor has no setting for this choice, so its
lowering helper is swapped while the engine compiles; concatenations narrower than 256 (RoPE's
halves) keep inductor's choice. The compile caches key on inductor's config, not on a lowering,
so a no-op post-grad pass whose uuid names this file keeps their entries apart.
It can go when inductor lowers such concatenations as ConcatKernel by itself.
"""

from __future__ import annotations

import contextlib

import torch

VERSIONS = ("2.11", "2.12", "2.13")
MIN_WIDTH = 256


def available() -> bool:
    if not torch.__version__.startswith(VERSIONS):
        return False
    try:
        from torch._inductor import config, ir, lowering  # noqa: F401
    except ImportError:
        return False
    return hasattr(lowering, "pointwise_cat") and hasattr(ir, "ConcatKernel") and hasattr(
        config, "post_grad_custom_post_pass")


@contextlib.contextmanager
def wide_cat_slices(on: bool = True):
    """While active, compilation lowers wide last-dimension concatenations as slices."""
    if not on or not available():
        yield False
        return
    from torch._inductor import config, ir, lowering
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    if config.post_grad_custom_post_pass is not None:  # the user's own pass: leave it alone
        yield False
        return
    plain = lowering.pointwise_cat

    def cat(inputs, dim=0):
        sizes = lowering.V.graph.sizevars
        if dim == len(inputs[0].get_size()) - 1 and all(
                sizes.statically_known_geq(x.get_size()[dim], MIN_WIDTH) for x in inputs):
            return lowering.TensorBox(ir.ConcatKernel.create(inputs, dim))
        return plain(inputs, dim)

    class CacheKey(CustomGraphPass):
        def __call__(self, graph):
            pass

        def uuid(self):
            return get_hash_for_files((__file__,), "wide_cat_slices")

    lowering.pointwise_cat = cat
    try:
        with config.patch(post_grad_custom_post_pass=CacheKey()):
            yield True
    finally:
        lowering.pointwise_cat = plain
