"""The training loop: token blocks -> forward and loss -> backward -> clip -> AdamW -> schedule,
with evaluation, logs, checkpoints, resume, early stopping and a time budget.

`train(model, train_blocks, val_blocks, t, ...)` is the entry point for the stage and the
benchmarks. One step, in order (the `while` loop in `train`):
  1. `grad_accum` micro-batches, each: the batch to the device (pinned memory, non-blocking), the
     summed token loss of CausalLMLoss (compiled), divided by the step's label count (counted on
     the host from the CPU batch: no sync), backward (DDP all-reduces on the last micro-batch);
  2. the gradient norm; clipping (folded into the fused optimizer's grad_scale, or in place);
  3. the optimizer and scheduler steps, gradients set to None.
The loop never reads a device value on a training step: at log steps the loss and norm are
copied to pinned host memory and logged when the copy has landed (deferred_logs), so the host
keeps its lead over the GPU. The speed levers are transforms.py's; this file only applies them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import statistics
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import io
from ..modeling import base_model
from ..params import Train
from . import adamw, checkpoints, fused_ce, transforms, trackers
from .data import Blocks, evenly_spaced
from .private import inductor_cat, optimizer_grad_scale

log = logging.getLogger("codex.train")
STATE = "state.pt"


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, before torch.distributed is initialised."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return world()[0] == 0


def sharded(t: Train) -> bool:
    """FSDP over several ranks: the parameters are shards, not whole tensors."""
    return t.distributed == "fsdp" and world()[1] > 1


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
    compile_mode: str | None = None
    loss: str = "model"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class State:
    """What a checkpoint holds besides the weights, optimizer and scheduler."""
    step: int = 0
    micro_batches: int = 0  # the data position: global micro-batches consumed (engine.Order)
    log_history: list = field(default_factory=list)  # {"step", "loss", ...} and {"step", "eval_loss"}
    best_val: float | None = None
    evals_without_gain: int = 0


@dataclass
class Trained:
    model: nn.Module           # the transformers (or peft) model, transforms undone, not wrapped
    state: State
    result: Result
    state_dict: dict | None = None  # FSDP: the full state dict (gathered on every rank)


def check_data(train_blocks, val_blocks, t: Train) -> int:
    """Enough blocks for one optimizer step on every rank and for a val loss; returns the blocks
    one step takes. The stage calls it before it touches any output."""
    from ..stage import UserError

    ranks = world()[1]
    per_step = t.batch_size * t.grad_accum * ranks
    if len(train_blocks) < per_step:
        raise UserError(f"train split packs into {len(train_blocks)} blocks of {t.block_size} "
                        f"tokens, fewer than one step needs ({per_step}); lower train.batch_size "
                        "or train.block_size, or add data")
    if len(val_blocks) < ranks:
        raise UserError(f"val split packs into {len(val_blocks)} blocks of {t.block_size} tokens, "
                        f"fewer than the {ranks} ranks (each evaluates at least one); lower "
                        "train.block_size or add data")
    return per_step


class Order:
    """The order blocks are trained in, as index batches for a DataLoader: epoch e is a
    permutation drawn from seed + e, held as int64 (8 bytes a block, never a Python list);
    global micro-batch k gives rank r the blocks perm[(j * world + r) * B:][:B], j = k within its
    epoch (the remainder of an epoch is dropped). Starting at micro-batch `start` resumes exactly."""

    def __init__(self, n: int, batch: int, ranks: int, rank: int, seed: int, start: int = 0):
        self.n, self.batch, self.ranks, self.rank, self.seed, self.start = n, batch, ranks, rank, seed, start
        self.per_epoch = n // (batch * ranks)

    def __iter__(self):
        k, epoch, perm = self.start, None, None
        while True:
            e, j = divmod(k, self.per_epoch)
            if e != epoch:
                # seed + epoch, as accelerate's seedable sampler drew it for the HF Trainer: the
                # same batches as runs made before this loop.
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed + e))
            lo = (j * self.ranks + self.rank) * self.batch
            yield perm[lo: lo + self.batch].tolist()
            k += 1


class CausalLMLoss(nn.Module):
    """The training graph: input ids and labels to the summed token loss (labels shifted by one,
    -100 ignored). `fused`: the decoder's hidden states and the head's weight go to
    fused_ce.LinearCrossEntropy, which makes the logits' gradient in the forward pass and never
    keeps the logits; otherwise the model's own loss."""

    def __init__(self, model: nn.Module, fused: bool):
        super().__init__()
        self.model, self.fused = model, fused

    def forward(self, input_ids, labels):
        if not self.fused:
            return self.model(input_ids=input_ids, labels=labels, use_cache=False,
                              num_items_in_batch=1).loss  # 1: the sum, not the mean
        base = base_model(self.model)
        h = base.model(input_ids=input_ids, use_cache=False).last_hidden_state
        y = F.pad(labels, (0, 1), value=fused_ce.IGNORE)[:, 1:].reshape(-1)
        return fused_ce.LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), base.lm_head.weight, y)


def counted(labels: torch.Tensor) -> int:
    """Tokens a batch's loss counts (labels shifted by one, -100 ignored), from a CPU tensor."""
    return int((labels[:, 1:] != fused_ce.IGNORE).sum())


def bf16_allreduce(process_group, bucket):
    """DDP's gradient all-reduce in bf16, then back into the fp32 bucket (what torch's
    bf16_compress_hook does; DDP refuses that one in a torch built without CUDA, so the CPU tests
    could not run the GPUs' hook). Public APIs only: the bucket's buffer, an async all_reduce and
    its future. (No annotations: DDP checks them against its own types, and this module's are
    strings.)"""
    import torch.distributed as dist

    group = process_group or dist.group.WORLD
    buf = bucket.buffer()
    half = buf.to(torch.bfloat16).div_(dist.get_world_size(group))
    fut = dist.all_reduce(half, group=group, async_op=True).get_future()

    def back(fut):
        buf.copy_(fut.value()[0])
        return buf
    return fut.then(back)


def _wrap(model: nn.Module, loss_mod: nn.Module, t: Train, device: torch.device) -> nn.Module:
    """DDP around the loss module, or FSDP2 (fully_shard) over the decoder layers and the model."""
    ws = world()[1]
    if ws == 1:
        return loss_mod
    if sharded(t):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ws,))
        layers = set(getattr(base_model(model), "_no_split_modules", None) or ["LlamaDecoderLayer"])
        for m in list(model.modules()):
            if type(m).__name__ in layers:
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return loss_mod
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Gradients as views into the all-reduce buckets (no copy back out of them, held once); no
    # buffer broadcast before each forward (the buffers follow from the config, equal on all ranks).
    ddp = DDP(loss_mod, device_ids=[device.index] if device.type == "cuda" else None,
              bucket_cap_mb=t.ddp_bucket_mb, gradient_as_bucket_view=True,
              broadcast_buffers=False, find_unused_parameters=False)
    if t.ddp_allreduce == "bf16":
        ddp.register_comm_hook(None, bf16_allreduce)
        log.info("DDP all-reduces gradients in bf16")
    return ddp


def _optimizer(model: nn.Module, t: Train, plan: transforms.Plan, copies: dict):
    """AdamW (betas 0.9/0.95), weight decay on matrices only (not norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kw = dict(lr=t.lr, betas=(0.9, 0.95), eps=1e-8)
    if plan.fused_adamw:
        return adamw.AdamW16(groups, copies=copies, fused=True, **kw)
    return torch.optim.AdamW(groups, fused=plan.device == "cuda" and not sharded(t) or None, **kw)


def _scheduler(opt, t: Train, max_steps: int):
    from transformers import get_scheduler

    extra = {"min_lr_rate": 0.1} if t.scheduler == "cosine_with_min_lr" else None
    return get_scheduler(t.scheduler, opt, num_warmup_steps=t.warmup_steps,
                         num_training_steps=max_steps, scheduler_specific_kwargs=extra)


def _rng_state() -> dict:
    """The RNG states as tensors and plain values, so checkpoints load with weights_only=True."""
    kind, keys, *rest = np.random.get_state()
    s = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest),
         "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def _fsdp(model) -> bool:
    return any(hasattr(m, "unshard") for m in model.modules())  # fully_shard'ed modules


def _full_state(model, opt) -> tuple[dict, dict]:
    """Whole (unsharded) model and optimizer state dicts on the CPU; under FSDP a collective."""
    if _fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), opt.state_dict()


def _load_full_state(model, opt, msd: dict, osd: dict) -> None:
    if _fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(msd)
        opt.load_state_dict(osd)


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(out_dir: Path, model, opt, sched, st: State, fp: str, keep: int) -> Path:
    """checkpoint-<step>/: state.pt (weights, optimizer, scheduler, loop state; rank 0), rng-<rank>.pt
    (every rank), then the completion marker (atomic, last) and best-k + latest retention."""
    rank = world()[0]
    d = out_dir / f"checkpoint-{st.step}"
    msd, osd = _full_state(model, opt)  # every rank: a collective under FSDP
    if rank == 0:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        torch.save({"model": msd, "optimizer": osd, "scheduler": sched.state_dict(),
                    "state": asdict(st)}, d / STATE)
    _barrier()
    torch.save(_rng_state(), d / f"rng-{rank}.pt")
    _barrier()
    if rank == 0:
        val = next((h["eval_loss"] for h in reversed(st.log_history)
                    if "eval_loss" in h and h["step"] == st.step), None)
        checkpoints.mark_complete(d, fp, st.step, val)
        checkpoints.rotate(out_dir, keep)
    return d


def load_checkpoint(d: Path, model, opt, sched) -> State:
    blob = torch.load(d / STATE, map_location="cpu", weights_only=True)
    _load_full_state(model, opt, blob["model"], blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    rng = d / f"rng-{world()[0]}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    return State(**blob["state"])


class Logs:
    """Log steps' values (the loss summed since the previous log, the gradient norm) without a
    host sync: copied to pinned host memory behind the step (non-blocking) and emitted, in
    order, once the copy has landed or at a flush (before an evaluation, a checkpoint, the end).
    The throughput between two logs is the GPU's time between them (CUDA events); the host's
    clock at emission says when a copy was noticed, not when its step ended."""

    def __init__(self, deferred: bool, tokens_per_step: int, emit):
        self.deferred, self.tokens_per_step, self.emit = deferred, tokens_per_step, emit
        self.pending: list = []
        self.last = None  # (event or host time, step) of the previous log

    def restart(self, step: int):
        """Time the next interval from here (after an evaluation or a checkpoint)."""
        self.last = (self._mark(), step)

    def _mark(self):
        if self.deferred:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.deferred else b - a

    def add(self, step: int, loss_sum: torch.Tensor, steps: int, norm, lr: float, epoch: float):
        vals = [loss_sum.detach().float()]
        if norm is not None:
            full = getattr(norm, "full_tensor", None)  # FSDP: a DTensor, whole by a collective
            vals.append((full() if full else norm).detach().float())
        v = torch.stack(vals)
        if self.deferred:
            host = torch.empty(len(vals), pin_memory=True)
            host.copy_(v, non_blocking=True)
        else:
            host = v
        self.pending.append((host, self._mark(), dict(step=step, steps=steps, lr=lr, epoch=epoch)))
        self.poll()

    def poll(self, flush: bool = False):
        while self.pending and (flush or not self.deferred or self.pending[0][1].query()):
            host, mark, meta = self.pending.pop(0)
            if self.deferred:
                mark.synchronize()
            vals = host.tolist()
            rec = {"step": meta["step"], "epoch": round(meta["epoch"], 4),
                   "loss": vals[0] / meta["steps"], "learning_rate": meta["lr"]}
            if len(vals) > 1:
                rec["grad_norm"] = vals[1]
            if self.last is not None and meta["step"] > self.last[1]:
                secs = self._seconds(self.last[0], mark)
                if secs > 0:
                    rec["tokens_per_s"] = round((meta["step"] - self.last[1]) * self.tokens_per_step / secs, 1)
            self.last = (mark, meta["step"])
            self.emit(rec)


def evaluate(model, val: torch.Tensor, batch: int, plan: transforms.Plan, device) -> float:
    """Mean token loss over this rank's share of `val`, summed over ranks (a collective)."""
    import torch.distributed as dist

    rank, ws = world()
    mine = val[rank::ws]
    was = model.training
    model.eval()
    loss_sum, n = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad(), _autocast(plan):
        for i in range(0, len(mine) - batch + 1, batch):
            x = mine[i: i + batch]
            loss_sum += model(input_ids=x.to(device), labels=x.to(device), use_cache=False,
                              num_items_in_batch=1).loss.double()
            n += counted(x)
    total = torch.stack([loss_sum, torch.tensor(float(n), dtype=torch.float64, device=device)])
    if ws > 1:
        dist.all_reduce(total)
    model.train(was)
    s, n = total.tolist()
    return s / n if n else float("nan")


def _autocast(plan: transforms.Plan):
    if plan.precision in ("bf16", "fp16"):
        return torch.autocast(plan.device, dtype=torch.bfloat16 if plan.precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def train(model, train_blocks, val_blocks, t: Train, *, seed: int, out_dir: str | Path,
          fingerprint: str = "", resume_from: str | Path | None = None, live=None,
          max_steps: int | None = None, on_step=None) -> Trained:
    """Train `model` on blocks (TokenBlocks, a LongTensor, or a Dataset of {input_ids, labels}),
    checkpointing under `out_dir` (marked with `fingerprint`), continuing from `resume_from`
    (checkpoints.find_resumable) when given. `live`: a dvclive.Live on rank 0, None elsewhere.
    `on_step(step)`: called after each optimizer step (benchmarks time steps with it)."""
    rank, ws = world()
    max_steps = max_steps or t.max_steps
    per_step = check_data(train_blocks, val_blocks, t)
    tokens_per_step = per_step * t.block_size
    # Every rank evaluates whole batches of the same size.
    eval_batch = min(t.batch_size, len(val_blocks) // ws)
    per_rank = max(1, min(math.ceil(t.eval_batches / ws), len(val_blocks) // (ws * eval_batch)))
    val = evenly_spaced(val_blocks, per_rank * ws * eval_batch)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    plan = transforms.resolve(t, model, sharded=sharded(t))
    model.to(device)
    model.train()
    done = transforms.optimize(model, plan, t.block_size)
    loss_mod = CausalLMLoss(model, plan.loss == "fused")
    step_mod = _wrap(model, loss_mod, t, device)
    opt = _optimizer(model, t, plan, done.copies)
    sched = _scheduler(opt, t, max_steps)
    st = State()
    if resume_from:
        st = load_checkpoint(Path(resume_from), model, opt, sched)
        log.info("resumed from %s at step %d", resume_from, st.step)
    adamw.refresh_copies(done.copies)  # the copies follow loaded or broadcast weights
    start_step = st.step
    scaler = torch.amp.GradScaler(plan.device) if plan.precision == "fp16" else None
    graphs = plan.compile_mode in ("reduce-overhead", "max-autotune")
    ddp = ws > 1 and not sharded(t)  # DDP syncs gradients on the last micro-batch only
    fwd = torch.compile(step_mod, mode=plan.compile_mode) if plan.compile else step_mod
    params = [p for p in model.parameters() if p.requires_grad]
    ds = train_blocks if isinstance(train_blocks, torch.utils.data.Dataset) else Blocks(train_blocks)
    order = Order(len(ds), t.batch_size, ws, rank, seed, start=st.micro_batches)
    loader = iter(torch.utils.data.DataLoader(
        ds, batch_sampler=order, num_workers=t.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False))
    track = trackers.Trackers(t.report_to, live) if rank == 0 else None

    def emit(rec: dict):
        st.log_history.append(rec)
        if track is not None:
            track.log(rec["step"], {k: v for k, v in rec.items() if k != "step"})
            log.info("step %d/%d %s", rec["step"], max_steps, json.dumps(
                {k: round(v, 6) if isinstance(v, float) else v for k, v in rec.items() if k != "step"}))

    logs = Logs(plan.deferred_logs, tokens_per_step, emit)
    loss_sum = torch.zeros((), device=device)
    since_log = 0

    def eval_and_save(final: bool) -> None:
        """At an eval/save step, what its grid asks; at the last step (final), whatever it lacks."""
        logs.poll(flush=True)
        if final:
            due = not any("eval_loss" in h and h["step"] == st.step for h in st.log_history)
        else:
            due = st.step % t.eval_every == 0
        if due:
            v = evaluate(model, val, eval_batch, plan, device)
            emit({"step": st.step, "eval_loss": v})
            if st.best_val is None or v < st.best_val:
                st.best_val, st.evals_without_gain = v, 0
            else:
                st.evals_without_gain += 1
        if (due or not (out_dir / f"checkpoint-{st.step}").exists()) if final else st.step % t.save_every == 0:
            save_checkpoint(out_dir, model, opt, sched, st, fingerprint, t.keep_checkpoints)
        logs.restart(st.step)

    steps_per_epoch = order.per_epoch / t.grad_accum
    stop = None
    run_t0 = time.perf_counter()
    with inductor_cat.wide_cat_slices(bool(plan.fused_proj) and plan.compile):
        logs.restart(st.step)
        while st.step < max_steps and stop is None:
            batches = [next(loader) for _ in range(t.grad_accum)]
            n = sum(counted(b["labels"]) for b in batches)
            for i, b in enumerate(batches):
                x = b["input_ids"].to(device, non_blocking=True)
                y = b["labels"].to(device, non_blocking=True)
                sync = not ddp or i == t.grad_accum - 1
                with (contextlib.nullcontext() if sync else step_mod.no_sync()):
                    if graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    with _autocast(plan):
                        total = fwd(x, y)
                    loss = total / max(n, 1)
                    (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                scaler.unscale_(opt)
            norm = None
            if t.max_grad_norm > 0:
                if plan.fused_clip and optimizer_grad_scale.folds(opt):
                    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                    optimizer_grad_scale.clip(opt, norm, t.max_grad_norm)
                else:
                    norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            lr = sched.get_last_lr()[0]
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if done.copies and not isinstance(opt, adamw.AdamW16):
                adamw.refresh_copies(done.copies)
            sched.step()
            opt.zero_grad(set_to_none=True)
            st.step += 1
            st.micro_batches += t.grad_accum
            since_log += 1
            if st.step % t.log_every == 0 or st.step == 1 or st.step == max_steps:
                logs.add(st.step, loss_sum, since_log, norm, lr, st.step / steps_per_epoch)
                loss_sum = torch.zeros((), device=device)
                since_log = 0
            elif logs.pending:
                logs.poll()
            if t.max_time_s and time.perf_counter() - run_t0 >= t.max_time_s:
                stop = "time"
                log.info("train.max_time_s = %s reached at step %d: stopping", t.max_time_s, st.step)
            if st.step % t.eval_every == 0 or st.step % t.save_every == 0:
                eval_and_save(final=False)
                if t.early_stopping_patience and st.evals_without_gain >= t.early_stopping_patience:
                    stop = "early"
                    log.info("early stopping at step %d: val loss not better than %.4f for %d evaluations",
                             st.step, st.best_val, st.evals_without_gain)
            if on_step is not None:
                on_step(st.step)
        if st.step > start_step:
            eval_and_save(final=True)
    logs.poll(flush=True)
    train_s = time.perf_counter() - run_t0
    del loader  # its worker processes end with it
    if track is not None:
        track.close()

    state_dict = None
    if sharded(t):
        state_dict = _full_state(model, opt)[0]
        # The gathered copies of tied weights (lm_head = embed_tokens) are separate tensors, which
        # save_pretrained would write twice; one tensor again, as in the model, it writes one.
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            if target in state_dict and source in state_dict:
                state_dict[target] = state_dict[source]
    if isinstance(opt, adamw.AdamW16):
        opt.copies = {}
    done.undo()
    hist = st.log_history
    evals = [h["eval_loss"] for h in hist if "eval_loss" in h]
    losses = [h["loss"] for h in hist if "loss" in h]
    run_tokens = (st.step - start_step) * tokens_per_step
    # Without a step this run, the rates are the checkpointed run's.
    rates = [h["tokens_per_s"] for h in hist
             if "tokens_per_s" in h and (h["step"] > start_step or not run_tokens)][2:]
    steady = round(statistics.median(rates), 1) if rates else None
    res = Result(
        steps=st.step, start_step=start_step, tokens=st.step * tokens_per_step,
        tokens_this_run=run_tokens,
        tokens_per_s=round(run_tokens / train_s, 1) if run_tokens else (steady or 0.0),
        steady_tokens_per_s=steady, wall_s=round(time.perf_counter() - t0, 2),
        final_train_loss=losses[-1] if losses else None,
        final_val_loss=evals[-1] if evals else None, best_val_loss=min(evals) if evals else None,
        resumed_from=str(resume_from) if resume_from else None,
        stopped_early=st.step < max_steps, precision=plan.precision, compiled=plan.compile,
        world_size=ws, compile_mode=plan.compile_mode, loss=plan.loss)
    if res.final_val_loss is not None and not math.isfinite(res.final_val_loss):
        log.warning("val loss is %s: training diverged (lower train.lr?)", res.final_val_loss)
    return Trained(model=model, state=st, result=res, state_dict=state_dict)
