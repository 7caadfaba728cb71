"""The training engine's speed levers: `resolve` turns `train.engine.*` into a Plan, `optimize`
applies the Plan's model transforms in one place, in this order, and `Optimized.undo` puts the
model back as it was (the stage saves the plain transformers model):

1. causal_attention: transformers' SDPA attention registered under another name, so it builds
   no attention mask and SDPA runs with is_causal. Compiled, transformers handed every attention
   call a T x T mask (it cannot rule out packed sequences while tracing); no flash kernel takes a
   mask, and the mask kernel computes the masked-out half too. The loop's batches have no padding
   and positions 0..T-1, so for a decoder with full attention in every layer it is the same
   attention. Excluded: models not on SDPA, models with sliding-window or chunked layers.
   `attention` (an SDPA backend tried first) is pinned inside the attention call, where compile
   records it: compile's caches key on the graph, not on the global SDPA flags.
2. rope_table: the rotary embedding reads cos/sin from a table made once (the same fp32
   arithmetic); compiled, inductor otherwise recomputes them in every layer, forward and backward.
   Only the plain RoPE (rope_type default), whose table is fixed.
3. fused_proj: q/k/v (with `all` also the MLP's gate/up) as one matmul over the concatenated
   weights; at width 768 the separate matmuls run below the big ones' speed. A module swap
   (FusedAttention, FusedMLP) that keeps the projections as children, so parameter names,
   checkpoints, the optimizer and DDP see the same parameters. Only LlamaAttention and the
   gate/up/down MLPs of plain nn.Linear layers (LoRA-wrapped layers keep their own); not under
   FSDP (its parameters are shards). Compiled, the backward's concatenation of the q/k/v output
   gradients must be lowered as slices (private/inductor_cat.py): without that it was slower
   than not fusing, so auto needs it.
4. bf16_weights: the matmuls of trainable bias-free Linear layers (all but the output head, which
   the fused loss reads) use a bf16 copy of their weights that the optimizer writes
   (adamw.AdamW16), instead of autocast casting every weight each step; the weight gradient comes
   out of its matmul in fp32. bf16 precision only, not under FSDP.
5. bf16_residual: under bf16 autocast the embeddings' output is cast to bf16, so the residual
   stream and its gradient are bf16 (Megatron's default) instead of the embedding's fp32.

The loop applies the rest where it belongs: the fused loss (it hands fused_ce the decoder's hidden
states and the head's weight), fused_adamw and fused_clip (its optimizer), compile and CUDA graphs,
deferred logs; cublas_workspace is an environment setting made before torch starts (process_env).
Each lever can go when torch/transformers do the same by themselves: re-measure with
bench/bench_train_gpu.py (`-S train.engine.<lever>=off` variants).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from ..modeling import base_model
from ..params import Train
from . import fused_ce
from .private import inductor_cat

log = logging.getLogger("codex.train")

CAUSAL_SDPA = "sdpa_is_causal"
FUSABLE_ATTENTION = ("LlamaAttention",)  # whose forward FusedAttention.forward reproduces
FUSABLE_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down(act(gate(x)) * up(x))


@dataclass(frozen=True)
class Plan:
    """train.engine.* resolved for this machine, model and run."""
    device: str
    precision: str
    compile: bool = False
    compile_mode: str | None = None
    attention: list | None = None   # SDPA backends in priority order; None: torch's order
    causal_attention: bool = False
    rope_table: bool = False
    loss: str = "model"
    bf16_residual: bool = False
    fused_proj: str = ""            # "", "qkv" or "all"
    bf16_weights: bool = False
    fused_adamw: bool = False
    fused_clip: bool = False
    deferred_logs: bool = False
    notes: dict = field(default_factory=dict)  # lever -> why auto left it off


def _error(msg: str):
    from ..stage import UserError
    return UserError(msg)


def resolve_precision(precision: str) -> str:
    """auto: bf16 where the GPU supports it, fp32 elsewhere (CPU autocast to bf16 is slower here)."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise _error("train.precision = fp16 needs a CUDA GPU (loss scaling is a GPU feature); "
                     "use auto, fp32 or bf16")
    return precision


def compile_mode(t: Train, sharded: bool) -> str:
    """auto = CUDA graphs (reduce-overhead) on a GPU: the step is hundreds of kernel launches, which
    a slower host cannot issue as fast as the GPU runs them. Not with FSDP or accumulation
    (graphs there are not measured)."""
    e = t.engine
    if e.compile_mode != "auto":
        return e.compile_mode
    graphs = torch.cuda.is_available() and t.grad_accum == 1 and not sharded
    return "reduce-overhead" if graphs else "default"


def process_env(t: Train, sharded: bool) -> dict[str, str]:
    """Environment for the training process, set before torch makes its first cuBLAS handle (the
    stage sets it before it starts or relaunches itself). cublas_workspace off: cuBLAS without a
    workspace, under which it does not run its GEMMs with a dynamic tile scheduler whose counter it
    zeroes first (a memset per matmul, each a CUDA-graph node with its gap). Auto only where
    measured: CUDA graphs on Hopper (without graphs the same setting slowed the host per matmul)."""
    choice = t.engine.cublas_workspace
    if choice == "on" or not torch.cuda.is_available():
        return {}
    graphs = compile_mode(t, sharded) in ("reduce-overhead", "max-autotune")
    if choice == "auto" and not (graphs and torch.cuda.get_device_capability()[0] == 9
                                 and t.engine.compile != "off"):
        return {}
    return {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}


def attention_backends(choice: str):
    """The SDPA backends in priority order with `choice` first, or None for torch's own order.
    The others stay as fallbacks, so a shape the chosen kernel rejects still runs."""
    if choice == "auto" or not torch.cuda.is_available():
        return None
    from torch.nn.attention import SDPBackend as B
    first = {"flash": B.FLASH_ATTENTION, "cudnn": B.CUDNN_ATTENTION,
             "efficient": B.EFFICIENT_ATTENTION, "math": B.MATH}[choice]
    return [first, *(b for b in (B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH)
                     if b != first)]


def _causal_why(base) -> str | None:
    cfg = getattr(base, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return f"the model attends with {getattr(cfg, '_attn_implementation', None)!r}, not sdpa"
    if (getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
            or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or [])):
        return "the model has sliding-window or chunked attention layers (they need their masks)"
    return None


def _rotaries(base) -> list:
    return [m for m in base.modules() if getattr(m, "rope_type", None) == "default"
            and isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def resolve(t: Train, model, *, sharded: bool = False) -> Plan:
    """Each lever: `on` where it cannot apply is a UserError naming why; `auto` is on where it
    was measured to help (a CUDA GPU) and applies."""
    e, cuda = t.engine, torch.cuda.is_available()
    base = base_model(model)
    precision = resolve_precision(t.precision)
    notes: dict[str, str] = {}

    def lever(name: str, choice: str, why_not: str | None, auto: bool) -> bool:
        if choice == "on" and why_not:
            raise _error(f"train.engine.{name} = on: {why_not}; use auto or off")
        if choice == "auto" and why_not:
            notes[name] = why_not
        return choice == "on" or (choice == "auto" and auto and not why_not)

    compiled = lever("compile", e.compile, None, cuda)
    loss_why = fused_ce.applies(model) or ("FSDP shards lm_head's weight, which the fused loss "
                                           "reads whole" if sharded else None)
    if e.loss == "fused" and loss_why:
        raise _error(f"train.engine.loss = fused: {loss_why}; use auto or model")
    loss = "fused" if e.loss == "fused" or (e.loss == "auto" and cuda and not loss_why) else "model"
    bf16 = None if precision == "bf16" else f"train.precision is {precision}, not bf16"
    no_fsdp = "FSDP's parameters are shards" if sharded else None

    proj_why = no_fsdp or (None if any(type(m).__name__ in FUSABLE_ATTENTION + FUSABLE_MLP
                                       for m in base.modules()) else "the model has no "
                           f"{' or '.join(FUSABLE_ATTENTION + FUSABLE_MLP)} modules")
    if e.fused_proj in ("qkv", "all") and proj_why:
        raise _error(f"train.engine.fused_proj = {e.fused_proj}: {proj_why}; use auto or off")
    if e.fused_proj == "auto":
        slices = inductor_cat.available()
        fused_proj = "all" if cuda and compiled and slices and not proj_why else ""
        if cuda and compiled and not slices:
            notes["fused_proj"] = f"no wide-concatenation lowering on torch {torch.__version__}"
    else:
        fused_proj = "" if e.fused_proj == "off" else e.fused_proj
    fused_opt = None if cuda else "no CUDA GPU (the fused optimizers are GPU kernels)"
    weights = lever("bf16_weights", e.bf16_weights, bf16 or no_fsdp, cuda)
    return Plan(
        device="cuda" if cuda else "cpu", precision=precision, compile=compiled,
        compile_mode=compile_mode(t, sharded) if compiled else None,
        attention=attention_backends(e.attention),
        causal_attention=lever("causal_attention", e.causal_attention, _causal_why(base), True),
        rope_table=lever("rope_table", e.rope_table,
                         None if _rotaries(base) else "the model has no plain (default) RoPE", True),
        loss=loss,
        bf16_residual=lever("bf16_residual", e.bf16_residual, bf16, True),
        fused_proj=fused_proj, bf16_weights=weights,
        fused_adamw=lever("fused_adamw", e.fused_adamw, fused_opt or no_fsdp, True),
        fused_clip=lever("fused_clip", e.fused_clip, fused_opt or no_fsdp or (
            "fp16's loss scaler owns the optimizer's grad_scale" if precision == "fp16" else None)
            or ("train.max_grad_norm is 0 (no clipping)" if t.max_grad_norm == 0 else None), True),
        deferred_logs=lever("deferred_logs", e.deferred_logs,
                            None if cuda else "values on a CPU cost nothing to read", True),
        notes=notes)


# ------------------------------------------------------------------ the modules swapped in
class Linear16(torch.autograd.Function):
    """x @ w16.T for bias-free Linear weights `ws` (one, or a fused group's stacked by rows) whose
    bf16 copy is w16: the matmuls autocast would run, minus its cast of every weight each step;
    the weight gradient comes out of its matmul in fp32 (autocast rounds it to bf16 and casts it
    back: another kernel per weight), split by rows to the fp32 weights."""

    @staticmethod
    def forward(ctx, x, w16, *ws):
        x16 = x.to(w16.dtype)
        ctx.save_for_backward(x16, w16)
        ctx.x_dtype, ctx.rows = x.dtype, [w.shape[0] for w in ws]
        return x16 @ w16.t()

    @staticmethod
    def backward(ctx, dy):
        x16, w16 = ctx.saved_tensors
        dy = dy.to(w16.dtype)
        d2, x2 = dy.reshape(-1, dy.shape[-1]), x16.reshape(-1, x16.shape[-1])
        # fp32 out of a bf16 matmul is a CUDA kernel (aten::mm.dtype); elsewhere cast after.
        dw = torch.mm(d2.t(), x2, out_dtype=torch.float32) if d2.is_cuda else (d2.t() @ x2).float()
        return ((dy @ w16).to(ctx.x_dtype), None, *dw.split(ctx.rows))


def _matmul(x, linears, w16):
    """x through the Linear layers `linears` as one matmul, outputs side by side."""
    if w16 is not None:
        return Linear16.apply(x, w16, *[m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, torch.cat([m.weight for m in linears]), bias)


def _rows(linears, copy) -> dict:
    """{each layer's weight: its rows of the stacked bf16 copy} (empty without a copy)."""
    if copy is None:
        return {}
    return dict(zip((m.weight for m in linears), copy.split([m.out_features for m in linears])))


def _bf16_copy(module: nn.Module, name: str, linears) -> None:
    """A non-persistent bf16 buffer of the layers' stacked weights (never saved)."""
    module.register_buffer(name, torch.cat([m.weight for m in linears]).detach().to(torch.bfloat16),
                           persistent=False)


class FusedAttention(nn.Module):
    """LlamaAttention's forward (transformers 5.17-5.24) with q/k/v as one matmul; for training
    only (no KV cache). Holds the original's projections under their names."""

    def __init__(self, attn: nn.Module, bf16_weights: bool):
        super().__init__()
        for k in ("config", "layer_idx", "head_dim", "scaling", "attention_dropout", "is_causal",
                  "num_key_value_groups"):
            setattr(self, k, getattr(attn, k))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.register_buffer("qkv16", None, persistent=False)
        if bf16_weights:
            _bf16_copy(self, "qkv16", self.qkv)

    @property
    def qkv(self):
        return (self.q_proj, self.k_proj, self.v_proj)

    def copies(self) -> dict:
        return _rows(self.qkv, self.qkv16)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        for k in ("cache", "past_key_values", "past_key_value"):
            if kwargs.pop(k, None) is not None:
                raise RuntimeError("FusedAttention is a training module: it keeps no KV cache")
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q, k, v = _matmul(hidden_states, self.qkv, self.qkv16).split(
            [m.out_features for m in self.qkv], dim=-1)
        q, k, v = (s.view(shape).transpose(1, 2) for s in (q, k, v))
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        impl = self.config._attn_implementation
        attend = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        out, weights = attend(self, q, k, v, attention_mask,
                              dropout=self.attention_dropout if self.training else 0.0,
                              scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class FusedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate/up as one matmul; the projections under their names."""

    def __init__(self, mlp: nn.Module, bf16_weights: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
        self.register_buffer("gate_up16", None, persistent=False)
        if bf16_weights:
            _bf16_copy(self, "gate_up16", (self.gate_proj, self.up_proj))

    def copies(self) -> dict:
        return _rows((self.gate_proj, self.up_proj), self.gate_up16)

    def forward(self, x):
        gate, up = _matmul(x, (self.gate_proj, self.up_proj), self.gate_up16).split(
            [self.gate_proj.out_features, self.up_proj.out_features], dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class Linear16Module(nn.Module):
    """A bias-free Linear whose matmul reads the bf16 copy `w16`; the same `weight` Parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        _bf16_copy(self, "w16", (linear,))

    def copies(self) -> dict:
        return {self.weight: self.w16}

    def forward(self, x):
        return Linear16.apply(x, self.w16, self.weight)


class RopeTable(nn.Module):
    """A rotary embedding's (cos, sin) looked up in a table of `n` positions made once."""

    def __init__(self, rot: nn.Module, n: int):
        super().__init__()
        scale = getattr(rot, "attention_scaling", 1.0)
        freqs = torch.arange(n, device=rot.inv_freq.device).float()[:, None] * rot.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(self, x, position_ids, *a, **k):
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear


def _copyable(linears) -> bool:
    """A fused group gets a bf16 copy when its layers are bias-free and trained (a frozen base
    layer under LoRA keeps autocast: no copy to hold, no weight gradient to make)."""
    return all(m.bias is None and m.weight.requires_grad for m in linears)


def _pinned(attend, backends):
    from torch.nn.attention import sdpa_kernel

    def pinned(*a, **k):
        with sdpa_kernel(backends, set_priority=True):
            return attend(*a, **k)
    return pinned


@dataclass
class Optimized:
    """What optimize() changed, to undo; `copies`: {fp32 weight: its rows of a bf16 copy}, which
    the optimizer keeps equal to the weights (adamw.AdamW16 writes them; adamw.refresh_copies)."""
    model: nn.Module
    copies: dict = field(default_factory=dict)
    swaps: list = field(default_factory=list)     # (parent, name, original module)
    hooks: list = field(default_factory=list)
    attn_before: str | None = None

    def undo(self) -> None:
        for parent, name, original in reversed(self.swaps):
            setattr(parent, name, original)
        for h in self.hooks:
            h.remove()
        base = base_model(self.model)
        if self.attn_before and base.config._attn_implementation == CAUSAL_SDPA:
            base.set_attn_implementation(self.attn_before)
        self.swaps, self.hooks, self.copies, self.attn_before = [], [], {}, None


def _swap(done: Optimized, parent: nn.Module, name: str, new: nn.Module) -> None:
    done.swaps.append((parent, name, getattr(parent, name)))
    setattr(parent, name, new)


def optimize(model: nn.Module, plan: Plan, length: int) -> Optimized:
    """Apply the plan's model transforms (the module docstring's order). `length`: the training
    sequence length (the RoPE table covers it and max_position_embeddings)."""
    from transformers import AttentionInterface

    base = base_model(model)
    done = Optimized(model)
    if plan.causal_attention:
        attend = ALL_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register(CAUSAL_SDPA, _pinned(attend, plan.attention) if plan.attention else attend)
        done.attn_before = base.config._attn_implementation
        base.set_attn_implementation(CAUSAL_SDPA)
    if plan.rope_table:
        n = max(getattr(base.config, "max_position_embeddings", 0) or 0, length)
        rots = {id(m) for m in _rotaries(base)}
        for parent in list(base.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in rots:
                    _swap(done, parent, name, RopeTable(child, n))
    head = base.get_output_embeddings()
    w16 = plan.bf16_weights
    for parent in list(base.modules()) if plan.fused_proj else []:
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if (kind in FUSABLE_ATTENTION and all(_plain_linear(getattr(child, n)) for n in
                                                  ("q_proj", "k_proj", "v_proj"))):
                _swap(done, parent, name, FusedAttention(child, w16 and _copyable(
                    [getattr(child, n) for n in ("q_proj", "k_proj", "v_proj")])))
            elif (plan.fused_proj == "all" and kind in FUSABLE_MLP
                  and _plain_linear(child.gate_proj) and _plain_linear(child.up_proj)):
                _swap(done, parent, name, FusedMLP(child, w16 and _copyable([child.gate_proj, child.up_proj])))
    for parent in list(base.modules()) if w16 else []:
        fused = isinstance(parent, (FusedAttention, FusedMLP))
        for name, child in list(parent.named_children()):
            if (_plain_linear(child) and child is not head and child.bias is None
                    and child.weight.requires_grad and (not fused or name in ("o_proj", "down_proj"))):
                _swap(done, parent, name, Linear16Module(child))
    for m in base.modules():
        if isinstance(m, (FusedAttention, FusedMLP, Linear16Module)):
            done.copies.update(m.copies())
    if plan.bf16_residual:
        emb = base.get_input_embeddings()
        done.hooks.append(emb.register_forward_hook(lambda m, i, o: o.to(torch.bfloat16)))
    log.info("engine: %s", describe(plan, done))
    return done


def describe(plan: Plan, done: Optimized | None = None) -> str:
    on = [k for k in ("causal_attention", "rope_table", "bf16_residual", "bf16_weights",
                      "fused_adamw", "fused_clip", "deferred_logs") if getattr(plan, k)]
    s = (f"{plan.device}, {plan.precision}, compile {plan.compile_mode or 'off'}, loss {plan.loss}, "
         f"fused_proj {plan.fused_proj or 'off'}; on: {', '.join(on) or 'none'}")
    if done is not None:
        s += f"; {len(done.swaps)} modules swapped"
    return s
