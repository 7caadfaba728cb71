"""The training engine: the HF Trainer with our checkpoint policy, throughput and dvclive metrics.

`train(model, train_blocks, val_blocks, t, ...)` is the single entry point; the stage and the
benchmarks call it with a model, packed blocks and a step budget.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MethodType

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback

from ..modeling import base_model
from ..params import Train
from . import adamw, checkpoints, fused_ce
from .data import Blocks, evenly_spaced

log = logging.getLogger("codex.train")


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, before torch.distributed is initialised."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def sharded(t: Train) -> bool:
    """FSDP over several ranks: the parameters are shards, not whole tensors."""
    return t.distributed == "fsdp" and world()[1] > 1


def resolve_precision(precision: str) -> str:
    """auto: bf16 where the GPU supports it, fp32 elsewhere (CPU autocast to bf16 is slower here)."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        from ..stage import UserError
        raise UserError("train.precision = fp16 needs a CUDA GPU (loss scaling is a GPU feature); "
                        "use auto, fp32 or bf16")
    return precision


def resolve_fused(mode: str) -> bool:
    """Liger kernels need Triton on a CUDA GPU; `on` without them is a clear error, not a crash.
    `auto` leaves them off: on torch 2.11 + liger-kernel 0.8.5 (H200, 2026-11-29) torch.compile
    fails on Liger's fused linear cross-entropy, and compile is the measured win."""
    if mode in ("off", "auto") or not torch.cuda.is_available():
        if mode == "on" and not torch.cuda.is_available():
            from ..stage import UserError
            raise UserError("train.fused_kernels = on needs a CUDA GPU (Triton kernels); use auto or off")
        return False
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        if mode == "on":
            from ..stage import UserError
            raise UserError("train.fused_kernels = on needs the liger-kernel package; "
                            "pip install liger-kernel, or use auto/off") from None
        return False
    return True


def resolve_loss(choice: str, model, t: Train, liger: bool) -> str:
    """fused or model (see Train.loss). An explicit `fused` the model cannot take is a UserError."""
    from ..stage import UserError

    why = fused_ce.applies(model)
    if sharded(t):
        why = "FSDP shards lm_head's weight, which the fused loss reads whole"
    elif liger:
        why = "train.fused_kernels = on brings Liger's own fused loss"
    if choice == "fused" and why:
        raise UserError(f"train.loss = fused: {why}; use auto or model")
    if choice == "auto":
        return "fused" if torch.cuda.is_available() and not why else "model"
    return choice


def resolve_compile(mode: str) -> bool:
    # Off on CPU: bench/bench_train_cpu.py --compile measured no gain on the default model
    # (5.3k vs 5.8k tokens/s eager, before counting compile time).
    return mode == "on" or (mode == "auto" and torch.cuda.is_available())


def resolve_compile_mode(t: Train) -> str:
    """auto = CUDA graphs (reduce-overhead) on a CUDA GPU, default elsewhere. On an H200 at
    GPT-2-small shape (bench/RESULTS_GPU.md, session 7) the engine's step is ~930 kernel
    launches plus the Trainer's Python, which on a slower host took longer than the GPU's 31 ms
    of work: CUDA graphs 495k vs 460k tokens/s at 16 x 1024 (the GPU then idle 0.02 ms a step
    instead of 2.2), the same 523k at 32 x 1024 where the GPU was already the limit, no extra
    memory, 1.83x on 2 GPUs (DDP). FSDP and gradient accumulation keep `default` (graphs there
    are not measured)."""
    if t.compile_mode != "auto":
        return t.compile_mode
    graphs = torch.cuda.is_available() and t.grad_accum == 1 and not sharded(t)
    return "reduce-overhead" if graphs else "default"


CAUSAL_SDPA = "sdpa_is_causal"


def _pinned(attend, backends):
    """`attend` inside sdpa_kernel(backends): traced by torch.compile, the choice becomes part of
    the graph. Compile's caches (AOTAutograd's, inductor's) key on the graph, not on the global SDPA
    flags, so a choice set only around training got the kernel of whatever compiled that graph
    first (H200: `attention: flash` after an `auto` run ran cuDNN's kernel)."""
    from torch.nn.attention import sdpa_kernel

    def pinned(*a, **k):
        with sdpa_kernel(backends, set_priority=True):
            return attend(*a, **k)
    return pinned


@contextlib.contextmanager
def causal_attention(model, backends=None):
    """While training, run a model that uses SDPA with is_causal instead of an explicit mask.
    Compiled (torch < 2.14), transformers handed every attention call a T x T mask: it cannot rule
    out packed sequences while tracing. No flash kernel takes a mask, and the mask kernel computes
    the masked-out half too (9.5 of 42 ms a step, H200). Eager, it ruled them out with a host sync
    every step. The engine's batches are input_ids and labels only: no padding, no attention mask,
    no position ids (positions 0..T-1, no packed sequences), so for a decoder with full attention
    in every layer the two are the same attention. Registered without a mask function, the
    attention makes transformers build no mask at all. Models with sliding-window or chunked layers
    keep their masks. The model's own setting is back afterwards, so the saved config is unchanged.
    `backends` (see attention_backends) pins SDPA's kernel order inside the model's graph."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = base_model(model)
    cfg = getattr(base, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    local = (getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
             or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []))
    if before != "sdpa" or local:
        yield
        return
    attend = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register(CAUSAL_SDPA, _pinned(attend, backends) if backends else attend)
    try:
        base.set_attn_implementation(CAUSAL_SDPA)
    except Exception as e:  # a model outside transformers' attention interface: keep its own
        log.info("attention stays %s: %s", before, e)
    try:
        yield
    finally:
        if base.config._attn_implementation == CAUSAL_SDPA:
            base.set_attn_implementation(before)


@contextlib.contextmanager
def rope_table(model, length: int = 0):
    """While training, rotary embeddings read cos/sin from a table made once instead of computing
    them in every step. Compiled, inductor fused the cos/sin computation into each layer's q/k
    rotation kernels, so all 12 layers recomputed it, forward and backward: 2.5 ms of a 37 ms step
    (H200, GPT-2-small shape). The same fp32 arithmetic (bit for bit in eager mode). The table
    covers max_position_embeddings and `length` (the block size). Only for the plain RoPE
    (rope_type default) that holds its table fixed; dynamic variants keep computing theirs."""
    base = base_model(model)
    rots = [m for m in base.modules() if getattr(m, "rope_type", None) == "default"
            and isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    n = max(getattr(getattr(base, "config", None), "max_position_embeddings", 0) or 0, length)
    if not n:
        rots = []
    for rot in rots:
        scale = getattr(rot, "attention_scaling", 1.0)
        freqs = torch.arange(n, device=rot.inv_freq.device).float()[:, None] * rot.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        # Buffers, so the table follows the model's moves between devices; not saved.
        rot.register_buffer("_rope_cos", emb.cos() * scale, persistent=False)
        rot.register_buffer("_rope_sin", emb.sin() * scale, persistent=False)

        def forward(x, position_ids, *a, _rot=rot, **k):
            return (_rot._rope_cos[position_ids].to(x.dtype),
                    _rot._rope_sin[position_ids].to(x.dtype))
        rot.forward = forward
    try:
        yield
    finally:
        for rot in rots:
            del rot.forward, rot._rope_cos, rot._rope_sin


def attention_backends(choice: str):
    """The SDPA backends in priority order with `choice` first, or None for torch's own order.
    The others stay as fallbacks, so a shape the chosen kernel rejects still runs."""
    if choice == "auto" or not torch.cuda.is_available():
        return None
    from torch.nn.attention import SDPBackend as B
    first = {"flash": B.FLASH_ATTENTION, "cudnn": B.CUDNN_ATTENTION,
             "efficient": B.EFFICIENT_ATTENTION, "math": B.MATH}[choice]
    rest = [b for b in (B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH)
            if b != first]
    return [first, *rest]


@dataclass
class Result:
    steps: int
    start_step: int
    tokens: int
    tokens_this_run: int
    tokens_per_s: float
    # Median of the logged intervals after the first two (compilation, CUDA-graph capture, warm-up):
    # the rate a longer run settles at. None with fewer than three logged intervals.
    steady_tokens_per_s: float | None
    wall_s: float
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    resumed_from: str | None
    stopped_early: bool
    precision: str
    compiled: bool
    world_size: int
    fused_kernels: bool = False
    compile_mode: str | None = None
    loss: str = "model"

    def as_dict(self) -> dict:
        return asdict(self)


class Throughput(TrainerCallback):
    """Adds tokens/s (since the previous log) to the train logs and aligns dvclive's step with the
    optimizer step, so train and val curves share one x axis, also after a resume."""

    def __init__(self, tokens_per_step: int, live=None):
        self.tokens_per_step, self.live = tokens_per_step, live
        self.t0 = self.step0 = None
        # The GPU's time since the previous log, from DeferredLogs: the host's clock at a deferred
        # log tells when its copy was noticed, not when its step ended.
        self.gpu_seconds: float | None = None

    def on_train_begin(self, args, state, control, **kw):
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs and self.t0 is not None:
            now = time.perf_counter()
            steps = state.global_step - self.step0
            seconds = self.gpu_seconds if self.gpu_seconds is not None else now - self.t0
            self.gpu_seconds = None
            if steps > 0:
                logs["tokens_per_s"] = round(steps * self.tokens_per_step / seconds, 1)
                # The Trainer appended a copy of `logs` before calling us; keep the rate in the
                # history too (checkpoints' trainer_state.json, the steady rate in Result).
                state.log_history[-1]["tokens_per_s"] = logs["tokens_per_s"]
            self.t0, self.step0 = now, state.global_step
        if self.live is not None:
            self.live.step = state.global_step

    def on_evaluate(self, args, state, control, **kw):
        # Evaluation time is not training throughput.
        self.t0, self.step0 = time.perf_counter(), state.global_step


class LiveCurves(DVCLiveCallback):
    """dvclive's callback, minus the Trainer's end-of-run summary (train_runtime, total_flos, the
    run's mean loss as `train/loss`): logged as one-point "curves" they clutter `dvc plots show`;
    metrics/train.json has the run's figures."""

    def on_log(self, args, state, control, model=None, logs=None, **kw):
        if logs and "train_runtime" not in logs:
            super().on_log(args, state, control, model=model, logs=logs, **kw)


class CudaGraphSteps(TrainerCallback):
    """With CUDA graphs (compile modes reduce-overhead, max-autotune) each optimizer step is a new
    iteration: the graphs' output buffers of the previous step may then be reused."""

    def on_step_begin(self, args, state, control, **kw):
        torch.compiler.cudagraph_mark_step_begin()


class LowPrecisionOutputs(TrainerCallback):
    """accelerate wraps a mixed-precision model's forward so that every output is cast to fp32. For a
    causal LM that is an fp32 copy of all the logits each step (16 x 1024 x 50k: 3.1 GiB) that
    nothing reads: the loss is already computed in fp32 inside the model. Removing it took the
    engine from 0.92x to 0.95x of the plain loop on an H200 (bench/RESULTS_GPU.md). Runs after
    accelerate prepared the model and before the first forward, so compilation never sees the cast."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        from accelerate.utils.operations import ConvertOutputsToFp32

        inner = getattr(getattr(model.forward, "__func__", None), "__wrapped__", None)
        if isinstance(inner, ConvertOutputsToFp32):
            model.forward = MethodType(inner.model_forward, model)


class RefreshCopies(TrainerCallback):
    """fused_projections' bf16 weight copies follow the weights: at the start (the weights of a
    resumed checkpoint, or of rank 0 under DDP), and after each step of an optimizer that does
    not write them itself (adamw.AdamW16 does)."""

    def __init__(self, copies: dict):
        self.copies = copies

    def on_train_begin(self, args, state, control, **kw):
        adamw.refresh_copies(self.copies)

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if not isinstance(getattr(optimizer, "optimizer", optimizer), adamw.AdamW16):
            adamw.refresh_copies(self.copies)


class TimeBudget(TrainerCallback):
    """train.max_time_s: stop after a wall-clock budget, evaluating and saving the last step."""

    def __init__(self, seconds: float):
        self.seconds, self.t0 = seconds, None

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if time.perf_counter() - self.t0 >= self.seconds:
            log.info("train.max_time_s = %s reached at step %d: stopping", self.seconds,
                     state.global_step)
            control.should_training_stop = control.should_evaluate = control.should_save = True


# Session 13: the Trainer reads the loss and the gradient norm with .item() at each log, so every
# log_every steps the host waits for the GPU to drain, then the GPU waits for the host to start
# the next step (~3 ms at 16 x 1024 on an H200, 0.3 ms a step at log_every 10) and the host's
# lead, which hides its hiccups, starts from nothing. The benchmark's log_sync:1 ablation.
DEFERRED_LOGS = True


class DeferredLogs:
    """Stands in for `trainer._maybe_log_save_evaluate`: a log step's loss and gradient norm are
    copied to pinned host memory without waiting (stream-ordered, before the loss sum is zeroed),
    and the log is made, with its own step and epoch, at the first later step whose copy has
    landed; every pending log is made, in order, before an evaluation, a checkpoint, or the end
    of the epoch or of training, so the history reads as the Trainer's own. CUDA tensors only:
    elsewhere reading them costs nothing and the Trainer's own method runs as before."""

    devices = ("cuda",)  # where the loss lives for logs to be deferred

    def __init__(self, trainer, throughput: Throughput | None = None):
        # transformers 5.x's gather (4.x had a Trainer method): without it, the Trainer's own logs.
        from transformers import trainer_pt_utils

        self.gather = getattr(trainer_pt_utils, "nested_gather", None)
        self.trainer, self.own, self.throughput = trainer, trainer._maybe_log_save_evaluate, throughput
        self.pending: list[tuple] = []
        self.last = None  # the previous log's event, while only training ran since
        trainer._maybe_log_save_evaluate = self

    def event(self, device: torch.device):
        """Something whose query() says the copies queued so far have landed, and whose
        elapsed_time(later) is the GPU's milliseconds between the two."""
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(device))
        return ev

    def __call__(self, tr_loss, grad_norm, *args, **kw):
        tr, c = self.trainer, self.trainer.control
        st = tr.state
        if (c.should_log and st.global_step > tr._globalstep_last_logged and self.gather
                and tr_loss.device.type in self.devices):
            vals = [self.gather(tr_loss, tr.args.parallel_mode).mean()]
            if isinstance(grad_norm, torch.Tensor):
                # Under FSDP the norm is a DTensor, which copy_ to a plain tensor refuses (session
                # 14's GPU run); its whole value comes by a collective, not by waiting for the GPU.
                full = getattr(grad_norm, "full_tensor", None)
                vals.append((full() if full else grad_norm).float())
            host = torch.empty(len(vals), pin_memory=tr_loss.is_cuda)
            host.copy_(torch.stack(vals).detach(), non_blocking=True)
            lr = kw.get("learning_rate")
            meta = dict(step=st.global_step, epoch=st.epoch,
                        steps=st.global_step - tr._globalstep_last_logged,
                        grad_norm=None if isinstance(grad_norm, torch.Tensor) else grad_norm,
                        learning_rate=lr if lr is not None else tr._get_learning_rate())
            self.pending.append((host, self.event(tr_loss.device), meta))
            tr_loss -= tr_loss
            tr._globalstep_last_logged = st.global_step
            # No store_flos here: under DDP it all-gathers a host list and reads it back, the one
            # host sync left in a DDP log step (session 14's profile). The Trainer stores them
            # before each checkpoint and at the end, the only places its total is read.
            c.should_log = False
        flush = c.should_evaluate or c.should_save or c.should_training_stop or c.should_epoch_stop
        while self.pending and (flush or self.pending[0][1].query()):
            host, ev, meta = self.pending.pop(0)
            ev.synchronize()
            if self.throughput is not None and self.last is not None:
                self.throughput.gpu_seconds = self.last.elapsed_time(ev) / 1e3
            self.last = ev
            self.emit(host.tolist(), meta, kw.get("start_time", args[4] if len(args) > 4 else None))
        if c.should_evaluate or c.should_save:  # not training time: the next log times itself
            self.last = None
        return self.own(tr_loss, grad_norm, *args, **kw)

    def emit(self, vals: list, meta: dict, start_time=None):
        """The Trainer's log, as it would have made it at meta's step."""
        tr, st = self.trainer, self.trainer.state
        logs = {"loss": vals[0] / meta["steps"]}
        grad_norm = vals[1] if len(vals) > 1 else meta["grad_norm"]
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs["learning_rate"] = meta["learning_rate"]
        tr._total_loss_scalar += vals[0]
        now = st.global_step, st.epoch
        st.global_step, st.epoch = meta["step"], meta["epoch"]
        try:
            tr.log(logs, start_time)
        finally:
            st.global_step, st.epoch = now


class FinalEvalSave(TrainerCallback):
    """Evaluate and checkpoint at the last step too: the card reports the final weights' val loss,
    and a rerun after a crash while writing the output resumes at the end instead of redoing it."""

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            control.should_evaluate = control.should_save = True


def training_args(t: Train, out_dir: Path, seed: int, eval_batch: int, precision: str,
                  compiled: bool, max_steps: int, fused: bool = False, wrap: list[str] | None = None,
                  compile_mode: str = "default"):
    from transformers import TrainingArguments

    fsdp = {}
    if sharded(t):
        fsdp = dict(fsdp="full_shard auto_wrap",
                    fsdp_config={"transformer_layer_cls_to_wrap": wrap or ["LlamaDecoderLayer"]})
    sched_kwargs = {"min_lr_rate": 0.1} if t.scheduler == "cosine_with_min_lr" else {}
    return TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps, per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=eval_batch, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.scheduler, lr_scheduler_kwargs=sched_kwargs,
        max_grad_norm=t.max_grad_norm,  # 0: no clipping (the Trainer compares it with 0; None crashed)
        adam_beta2=0.95,
        logging_steps=t.log_every, logging_first_step=True,
        eval_strategy="steps", eval_steps=t.eval_every,
        save_strategy="steps", save_steps=t.save_every, save_total_limit=None,
        metric_for_best_model="eval_loss", greater_is_better=False,
        report_to="none", seed=seed, data_seed=seed, full_determinism=False,
        bf16=precision == "bf16", fp16=precision == "fp16",
        torch_compile=compiled, torch_compile_mode=compile_mode if compiled else None,
        use_cpu=not torch.cuda.is_available(),
        # The Trainer's NaN filter reads the loss every step, a host sync that stalls the GPU;
        # a NaN is better shown in the logged loss than silently averaged away.
        logging_nan_inf_filter=False,
        # A compiled model hides forward()'s signature, from which the Trainer infers the label
        # names; without them evaluation computes no loss.
        label_names=["labels"],
        # On a GPU: fused AdamW (one kernel for all parameters), TF32 matmuls for what stays fp32.
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        # accelerate copies each batch to the GPU with a blocking copy by default, which waits for
        # the GPU to finish the previous step: the GPU then idles while Python prepares the next.
        # From pinned memory the copy can be queued behind the running step instead.
        accelerator_config={"non_blocking": True} if torch.cuda.is_available() else None,
        dataloader_pin_memory=torch.cuda.is_available(),
        tf32=True if torch.cuda.is_available() else None,
        use_liger_kernel=fused,
        dataloader_num_workers=t.num_workers, dataloader_drop_last=True,
        ddp_find_unused_parameters=False, ddp_bucket_cap_mb=t.ddp_bucket_mb,
        # The model's buffers (RoPE tables) follow from its config, the same on every rank:
        # DDP's default broadcast of them before every forward is a collective for nothing.
        ddp_broadcast_buffers=False,
        disable_tqdm=not is_main() or None,
        **fsdp,
    )


# DDP's gradients as views into its all-reduce buckets. Without, DDP copies every gradient back
# out of its bucket after the all-reduce and holds the gradients twice (2 H200s, 16 x 1024: the
# 0.54 ms of copies go, +0.3% tokens/s, -0.46 GiB). A module constant: the benchmark's ablation.
DDP_BUCKET_VIEW = True


def ddp_handler(h, t: Train):
    """accelerate's DDP settings `h` (as the Trainer made them), with gradients as bucket views
    and, under `ddp_allreduce: bf16`, bf16_allreduce as the hook."""
    from accelerate.utils import DistributedDataParallelKwargs

    class Handler(DistributedDataParallelKwargs):
        def register_comm_hook(self, model):
            if t.ddp_allreduce == "bf16":
                model.register_comm_hook(None, bf16_allreduce)
    kw = {f.name: getattr(h, f.name) for f in dataclasses.fields(h)}
    return Handler(**{**kw, "gradient_as_bucket_view": DDP_BUCKET_VIEW})


def bf16_allreduce(process_group, bucket):
    """DDP's gradient all-reduce in bf16, then back into the fp32 bucket: torch's
    bf16_compress_hook, which DDP refuses to register in a torch built without CUDA; under this
    name it also runs on gloo, so the CPU tests run the same hook as the GPUs. (No annotations:
    DDP checks them against its own types, and this module's are strings.)"""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)


# Measured on an H200 at 16 x 1024 (bench/RESULTS_GPU.md, session 10): the clip in the optimizer
# +0.8% tokens/s, the bf16 residual stream +4.0% (1.04 ms less of inductor's kernels, -0.56 GiB),
# both 1.31x the plain loop against 1.25x, the loss curve as close to the plain loop's as before.
# Module constants: the benchmark's ablations.
FUSED_CLIP = True
BF16_RESIDUAL = True


def clip_in_optimizer(trainer, t: Train, precision: str) -> bool:
    """Gradient clipping folded into torch's fused AdamW: the clip factor becomes the optimizer's
    grad_scale (the divisor its kernel applies to each gradient as it reads it) instead of a pass
    that multiplies every gradient in place before the step. The Trainer's grad_norm is the same
    pre-clip norm. Only with the fused optimizer (the engine's on a GPU) and where nothing else
    uses grad_scale: not fp16 (the loss scaler's), not FSDP (its norm spans shards)."""
    if not (FUSED_CLIP and trainer.args.optim == "adamw_torch_fused" and t.max_grad_norm > 0
            and precision != "fp16" and not sharded(t)):
        return False

    def clip(self, model):
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        opt.grad_scale = torch.clamp((norm + 1e-6) / t.max_grad_norm, min=1.0)
        return norm
    trainer._clip_grad_norm = MethodType(clip, trainer)
    return True


@contextlib.contextmanager
def bf16_residual(model, on: bool):
    """The residual stream in bf16 under bf16 autocast: the input embeddings' output is cast, and
    every block then adds bf16 to bf16 (Megatron's default, fp32_residual_connection off). Without
    it the stream is fp32 (the embedding's dtype), and each block's norm and residual add read and
    write it, and its gradient, at twice the bytes."""
    emb = base_model(model).get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, i, o: o.to(torch.bfloat16)) if on else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


SIBLINGS = {"qkv": (("q_proj", "k_proj", "v_proj"),),
            "all": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))}
# H200, 16 x 1024 (bench/RESULTS_GPU.md, session 11): q/k/v and gate/up as one matmul each, with
# their backward's concatenations as slices (wide_cat_slices), 530k vs 517k tokens/s (+2.5%), 627
# kernels a step instead of 903. Without the slices it was 6% slower (session 7, and again in 11).
# A module constant: the benchmark's fused_proj:0|qkv ablations.
FUSED_PROJ = "all"
# Session 11: bf16 weight copies (Linear16) 533k vs 528k tokens/s (+0.9%), 535 kernels a step
# instead of 627. The benchmark's weights:cast ablation.
BF16_WEIGHTS = True
# Session 12: AdamW as one Triton kernel per param group that writes the bf16 copies too
# (adamw.AdamW16) instead of torch's fused AdamW and a copy pass: the optimizer 1.46 -> 1.16 ms a
# step, +0.5-0.8% tokens/s. The benchmark's adamw:torch ablation.
FUSED_ADAMW = True
# Session 13: cuBLAS without a workspace under CUDA graphs. With one, cuBLAS runs its cooperative
# GEMMs with a dynamic tile scheduler whose counter it zeroes first: 148 memsets a step at
# 16 x 1024, each a graph node with its gap (session 12: wall 30.41 -> 30.00 ms without them, the
# same tiles). Without graphs the same setting made the plain loop's host slower per matmul
# (10.8 ms a step idle), so only graph-replayed runs take it; and only on Hopper (sm_90), where it
# was measured. The benchmark's cublas_workspace:default ablation (in its own process: torch reads
# the setting once).
CUBLAS_NO_WORKSPACE = True


def cublas_without_workspace(compile_mode: str | None) -> bool:
    """Ask torch for cuBLAS handles without a workspace when this process's steps replay as CUDA
    graphs; effective only before the process's first cuBLAS call (torch reads the variables
    once), and never over the user's own settings. True when the variables now say so."""
    if not (CUBLAS_NO_WORKSPACE and torch.cuda.is_available()
            and compile_mode in ("reduce-overhead", "max-autotune")
            and torch.cuda.get_device_capability()[0] == 9):
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    os.environ.setdefault("CUBLASLT_WORKSPACE_SIZE", "0")
    return (os.environ["CUBLAS_WORKSPACE_CONFIG"], os.environ["CUBLASLT_WORKSPACE_SIZE"]) == (":0:0", "0")


@contextlib.contextmanager
def wide_cat_slices(on: bool):
    """While the engine compiles, a concatenation along the last dimension of inputs each at least
    256 wide is lowered by having each input's producer write its slice of the output (inductor's
    ConcatKernel), not as one pointwise kernel with a masked load per input. For the backward of
    fused_projections (the q/k/v and gate/up output gradients joined for one matmul) inductor chose
    the pointwise kernel, which also recomputed RoPE's backward inside it: 3.28 ms a step against
    0.58 ms as slices (H200, torch 2.11). Narrow concatenations (RoPE's 32-wide halves) keep
    inductor's choice. Inductor has no setting for this (torch 2.11), so its private lowering
    helper is swapped for the duration; the compile caches key on inductor's config, not on a
    lowering, so a no-op post-grad pass whose uuid names this code keeps their entries apart."""
    from torch._inductor import config, ir, lowering
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    plain = getattr(lowering, "pointwise_cat", None)
    if not on or plain is None or config.post_grad_custom_post_pass is not None:
        yield
        return

    def cat(inputs, dim=0):
        sizes = lowering.V.graph.sizevars
        if dim == len(inputs[0].get_size()) - 1 and all(
                sizes.statically_known_geq(x.get_size()[dim], 256) for x in inputs):
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
            yield
    finally:
        lowering.pointwise_cat = plain


class Linear16(torch.autograd.Function):
    """x @ w16.T for bias-free Linear layers whose fp32 weights `ws` (one, or a fused group's,
    stacked by rows) have a bf16 copy `w16` that bf16_weights keeps. The same matmuls as under
    autocast, minus autocast's cast of every weight each step, and the weight gradient comes out
    of its matmul in fp32 (autocast rounds it to bf16 and casts it back: another kernel per
    weight). Routed to the fp32 weights, split by rows."""

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


@contextlib.contextmanager
def fused_projections(model, which: str, bf16_weights: bool = False):
    """While training, the Linear layers that read the same input (attention's q/k/v; with `all`
    the MLP's gate/up too) run as one matmul over their concatenated weights: at width 768 the
    separate matmuls run below the big ones' speed (the q/k/v weight gradients as split-K
    kernels) and the input gradients are summed by extra kernels. The model's forward code runs
    unchanged: the first layer of a group computes all of the group's outputs and hands its
    siblings theirs when they are called on the same input tensor; on any other input a sibling
    computes its own. Weights stay separate parameters (checkpoints, optimizer, DDP unchanged).
    Only groups of plain nn.Linear of one input width (LoRA-wrapped layers keep their own). The
    engine turns it on with a CUDA GPU, compiled with wide_cat_slices (not on CPUs, where it is
    not measured and where it would move results by rounding: the input gradient is summed in
    another order).

    bf16_weights: every trainable bias-free plain Linear (the output embeddings aside: the fused
    loss reads them) and every such group runs through Linear16 on a bf16 copy of its weights,
    a buffer that is not saved. Yields {weight: its rows of the copy}, for the optimizer to keep
    equal to the weights in bf16 (adamw.AdamW16; empty without bf16_weights)."""
    base = base_model(model)
    groups = []
    for parent in base.modules() if which else []:
        for names in SIBLINGS[which]:
            mods = [getattr(parent, n, None) for n in names]
            if (all(type(m) is torch.nn.Linear for m in mods)
                    and len({(m.in_features, m.bias is None) for m in mods}) == 1):
                groups.append(mods)
    grouped = {id(m) for mods in groups for m in mods}
    head = base.get_output_embeddings()
    groups += [[m] for m in base.modules() if bf16_weights and type(m) is torch.nn.Linear
               and id(m) not in grouped and m is not head and m.weight.requires_grad and m.bias is None]
    copied = []  # modules holding a group's bf16 copy, and that group
    for mods in groups:
        ws = [m.weight for m in mods]
        if bf16_weights and all(w.requires_grad for w in ws) and mods[0].bias is None:
            mods[0].register_buffer("_w16", torch.cat(ws).detach().to(torch.bfloat16), persistent=False)
            copied.append((mods[0], ws))
        # State on the modules themselves, read through `self`: torch.compile reaches the weights by
        # attribute, which DDP's graph splitting can copy (through a function's defaults it failed
        # to: torch 2.11, "DefaultsSource.__init__() takes from 3 to 4 positional arguments").
        for i, m in enumerate(mods):
            m._codex_group = (tuple(mods), i)
            m.forward = MethodType(_group_forward if i == 0 else _sibling_forward, m)
        mods[0]._codex_handed = {}  # the input the group last ran on, and the siblings' outputs
    try:
        yield {w: v for m, ws in copied for w, v in zip(ws, m._w16.split([w.shape[0] for w in ws]))}
    finally:
        for mods in groups:
            for m in mods:
                for name in ("forward", "_codex_group", "_codex_handed"):
                    vars(m).pop(name, None)
        for m, _ in copied:
            del m._w16


def _group_forward(self, x):
    """fused_projections' forward of a group's first layer: the whole group's matmul, handing the
    siblings' outputs on (a group of one: just its matmul on the bf16 copy)."""
    mods = self._codex_group[0]
    if "_w16" in self._buffers:
        y = Linear16.apply(x, self._w16, *[m.weight for m in mods])
    else:
        b = None if self.bias is None else torch.cat([m.bias for m in mods])
        y = F.linear(x, torch.cat([m.weight for m in mods]), b)
    if len(mods) == 1:
        return y
    outs = y.split([m.out_features for m in mods], dim=-1)
    self._codex_handed.clear()
    self._codex_handed.update(x=x, outs=list(outs[1:]))
    return outs[0]


def _sibling_forward(self, x):
    mods, i = self._codex_group
    handed = mods[0]._codex_handed
    if handed and handed["x"] is x and handed["outs"][i - 1] is not None:
        out, handed["outs"][i - 1] = handed["outs"][i - 1], None
        if all(o is None for o in handed["outs"]):
            handed.clear()  # nothing of the step is kept alive after the group ran
        return out
    return F.linear(x, self.weight, self.bias)  # called on another input: its own matmul


def check_data(train_blocks: torch.Tensor, val_blocks: torch.Tensor, t: Train) -> int:
    """Enough packed data for one optimizer step on every rank and for a val loss; returns the
    blocks one step takes. The stage calls it before it touches any output."""
    from ..stage import UserError

    per_step = t.batch_size * t.grad_accum * world()[1]
    if len(train_blocks) < per_step:
        raise UserError(f"train split packs into {len(train_blocks)} blocks of {t.block_size} "
                        f"tokens, fewer than one step needs ({per_step}); lower train.batch_size "
                        "or train.block_size, or add data")
    ranks = world()[1]
    if len(val_blocks) < ranks:
        raise UserError(f"val split packs into {len(val_blocks)} blocks of {t.block_size} tokens, "
                        f"fewer than the {ranks} ranks (each evaluates at least one); lower "
                        "train.block_size or add data")
    return per_step


def train(model, train_blocks: torch.Tensor, val_blocks: torch.Tensor, t: Train, *, seed: int,
          out_dir: str | Path, fingerprint: str = "", resume_from: str | Path | None = None,
          live=None, max_steps: int | None = None, callbacks: list | None = None):
    """Train `model` on packed blocks, checkpointing under `out_dir` (marked with `fingerprint`),
    continuing from `resume_from` (see checkpoints.find_resumable) when given.
    Returns (trainer, Result). `live` is a dvclive.Live on rank 0, None elsewhere."""
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    ws = world()[1]
    max_steps = max_steps or t.max_steps
    per_step = check_data(train_blocks, val_blocks, t)
    # Every rank evaluates whole batches (the eval loader drops a partial one): with eval_batches
    # below the number of ranks, a rank got half a batch and evaluation had no loss at all.
    eval_batch = min(t.batch_size, len(val_blocks) // ws)
    per_rank = max(1, min(math.ceil(t.eval_batches / ws), len(val_blocks) // (ws * eval_batch)))
    val_blocks = evenly_spaced(val_blocks, per_rank * ws * eval_batch)

    precision, compiled = resolve_precision(t.precision), resolve_compile(t.compile)
    out_dir = Path(out_dir)
    set_seed(seed)
    wrap = getattr(base_model(model), "_no_split_modules", None)
    fused = resolve_fused(t.fused_kernels)
    if fused and compiled:
        log.warning("train.fused_kernels = on: torch.compile is turned off (it cannot trace Liger's "
                    "fused cross-entropy on this torch)")
        compiled = False
    compile_mode = resolve_compile_mode(t) if compiled else None
    cublas_without_workspace(compile_mode)
    loss = resolve_loss(t.loss, model, t, fused)
    args = training_args(t, out_dir, seed, eval_batch, precision, compiled, max_steps, fused=fused,
                         wrap=wrap, compile_mode=compile_mode or "default")
    tokens_per_step = per_step * t.block_size

    throughput = Throughput(tokens_per_step, live)
    cbs = [FinalEvalSave(), checkpoints.Keeper(fingerprint, t.keep_checkpoints), throughput]
    if precision == "bf16":
        cbs.append(LowPrecisionOutputs())
    if compile_mode in ("reduce-overhead", "max-autotune"):
        cbs.append(CudaGraphSteps())
    if live is not None:
        cbs.append(LiveCurves(live=live))
    if t.max_time_s:
        cbs.append(TimeBudget(t.max_time_s))
    if t.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    cbs += callbacks or []
    # A Dataset already (fim.FimBlocks: dicts with labels) goes in as it is; plain blocks get
    # labels = inputs.
    train_ds = train_blocks if isinstance(train_blocks, torch.utils.data.Dataset) else Blocks(train_blocks)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      eval_dataset=Blocks(val_blocks), callbacks=cbs)
    clip_in_optimizer(trainer, t, precision)
    if DEFERRED_LOGS:
        DeferredLogs(trainer, throughput)
    if ws > 1 and not sharded(t):
        # accelerate wraps the model in DDP with these settings, then registers the hook.
        trainer.accelerator.ddp_handler = ddp_handler(trainer.accelerator.ddp_handler, t)
        if t.ddp_allreduce == "bf16":
            log.info("DDP all-reduces gradients in bf16")

    t0 = time.perf_counter()
    start_step = checkpoints.step_of(resume_from) if resume_from else 0
    train_s = None
    if resume_from and start_step >= max_steps and not sharded(t):
        # The checkpoint holds the last step already (killed while the output was written, or a
        # rerun after a code change). Resuming would make the Trainer run one step past max_steps
        # (seen: 1101 of 1100, other weights), so load it and train nothing. (FSDP needs the
        # Trainer to shard the model first; there the extra step remains.)
        from transformers import TrainerState
        log.info("%s is at max_steps = %d: loading it, nothing left to train", resume_from,
                 max_steps)
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
    else:
        from torch.nn.attention import sdpa_kernel

        backends = attention_backends(t.attention)
        gpu = torch.cuda.is_available() and not sharded(t)
        fuse = FUSED_PROJ if gpu else ""
        bf16w = BF16_WEIGHTS and gpu and precision == "bf16"
        # Compilation picks the attention kernel while tracing, so the choice holds from the start;
        # causal_attention also pins it inside the model's graph (compile caches ignore the flags).
        with sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext(), \
                causal_attention(model, backends), rope_table(model, t.block_size), \
                fused_ce.fused_loss(model, loss == "fused"), \
                bf16_residual(model, BF16_RESIDUAL and precision == "bf16"), \
                fused_projections(model, fuse, bf16w) as copies, wide_cat_slices(bool(fuse) and compiled):
            if FUSED_ADAMW and gpu and args.optim == "adamw_torch_fused":
                # The Trainer's optimizer arguments (lr, betas, eps, fused) for our class; the
                # Trainer still makes the param groups (no weight decay for norms and biases).
                kw = Trainer.get_optimizer_cls_and_kwargs(args, model)[1]
                trainer.optimizer_cls_and_kwargs = (adamw.AdamW16, {**kw, "copies": copies})
            if copies:
                trainer.add_callback(RefreshCopies(copies))
            out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
            # Both hold the copies, gone from the model now.
            trainer.remove_callback(RefreshCopies)
            if isinstance(opt := getattr(trainer.optimizer, "optimizer", trainer.optimizer), adamw.AdamW16):
                opt.copies = {}
        train_s = out.metrics.get("train_runtime")
    st = trainer.state
    evals = [h for h in st.log_history if "eval_loss" in h]
    wall = time.perf_counter() - t0
    losses = [h["loss"] for h in st.log_history if "loss" in h]
    run_tokens = (st.global_step - start_step) * tokens_per_step
    train_s = train_s or wall
    # Without a step this run, the rates are the checkpointed run's.
    rates = [h["tokens_per_s"] for h in st.log_history
             if "tokens_per_s" in h and (h["step"] > start_step or not run_tokens)][2:]
    steady = round(statistics.median(rates), 1) if rates else None
    res = Result(
        steps=st.global_step, start_step=start_step, tokens=st.global_step * tokens_per_step,
        tokens_this_run=run_tokens,
        tokens_per_s=round(run_tokens / train_s, 1) if run_tokens else (steady or 0.0),
        steady_tokens_per_s=steady,
        wall_s=round(wall, 2), final_train_loss=losses[-1] if losses else None,
        final_val_loss=evals[-1]["eval_loss"] if evals else None,
        best_val_loss=min(h["eval_loss"] for h in evals) if evals else None,
        resumed_from=str(resume_from) if resume_from else None,
        stopped_early=st.global_step < max_steps, precision=precision, compiled=compiled,
        world_size=ws, fused_kernels=fused, compile_mode=compile_mode, loss=loss)
    if res.final_val_loss is not None and not math.isfinite(res.final_val_loss):
        log.warning("val loss is %s: training diverged (lower train.lr?)", res.final_val_loss)
    return trainer, res
