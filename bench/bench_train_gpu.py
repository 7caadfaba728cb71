"""GPU throughput of the train stage's own engine against a plain compiled PyTorch loop.

Both train the same GPT-2-small-shaped Llama decoder (12 layers, width 768, 12 heads, context 1024,
vocab ~50k) on the same packed real data, same seed, same batch, in one run. Prints tokens/s,
MFU (nanoGPT's formula), the engine/baseline ratio, peak memory, and whether the loss curves agree.

    python bench/bench_train_gpu.py --tokenizer models/tokenizer --tokens data/tokens
    python bench/bench_train_gpu.py --cpu-smoke          # a tiny shape on the CPU, to check the code
    torchrun --nproc_per_node 2 bench/bench_train_gpu.py --variants engine --profile 5   # DDP

The engine is called through codex_ml.training.engine.train: the stage's code path, not a copy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import params  # noqa: E402
from codex_ml.modeling import build_scratch, load_tokenizer  # noqa: E402
from codex_ml.training import engine, transforms  # noqa: E402
from codex_ml.data.tokens import TokenBlocks  # noqa: E402

# What torch says for each sync in sync-debug mode. Not just "synchroniz": turning the mode on
# also warns, once per process, "Synchronization debug mode is a prototype feature", which was
# counted as a sync of the first variant (the plain loop's 0.2 per step before 2026-11-30).
SYNC_WARNING = "called a synchronizing CUDA operation"
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM, nanoGPT's MFU denominator


def flops_per_token(model, seq: int) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # Llama has no position embeddings to drop
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * (
        c.hidden_size // c.num_attention_heads) * seq


KERNEL_KINDS = [  # (kind, substrings of the CUDA kernel's name), first match wins
    ("nccl", ("nccl",)),  # DDP's all-reduce, under torchrun
    ("loss (fused CE rows)", ("_rows_kernel",)),  # codex_ml/training/fused_ce.py's Triton kernel
    ("attention", ("sdpa", "flash", "fmha", "attention", "cudnn")),  # cuDNN's names say wgmma too
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "wgmma", "scaled_mm", "cublas", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused (inductor/triton)", ("triton",)),  # before copy: inductor names say _to_copy, cat
    ("copy/fill", ("memcpy", "memset", "copy", "fill")),
]


def short(name: str) -> str:
    return name.split("(")[0].removeprefix("void ")[:60]


def merged(spans) -> list[tuple[int, int]]:
    """The union of [start, end) spans, as sorted disjoint spans."""
    out: list[list[int]] = []
    for s0, s1 in sorted(spans):
        if out and s0 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], s1)
        else:
            out.append([s0, s1])
    return [(a, b) for a, b in out]


def overlap(a: list, b: list) -> list[tuple[int, int]]:
    """The intersection of two unions from merged()."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(spans) -> int:
    return sum(s1 - s0 for s0, s1 in spans)


class Probe:
    """Looks at steps [start, start + n) of a run: a torch.profiler trace of the GPU kernels
    (time by kind, and the GPU's busy share of the wall time), and with sync_debug the places that
    synchronise the host with the GPU (torch.cuda.set_sync_debug_mode), which stall the pipeline."""

    def __init__(self, start: int, n: int, sync_debug: bool):
        self.start, self.n, self.sync_debug = start, n, sync_debug
        self.prof = self.t0 = None
        self.syncs: dict[str, int] = {}
        self.summary: dict = {}

    def step_begin(self, step: int):
        if step == self.start and self.n:
            # On the CPU (--cpu-smoke) it records CPU ops instead, to test this code.
            self.cuda = cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.synchronize()
            A = torch.profiler.ProfilerActivity
            self.prof = torch.profiler.profile(activities=[A.CUDA if cuda else A.CPU])
            self.prof.__enter__()
            if self.sync_debug:
                self._hook()
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
            self.t0 = time.perf_counter()

    def _hook(self):
        """Count the sync-debug warnings by the Python line that caused them (each one, not just
        the first per line); other warnings pass through as before."""
        self._saved = warnings.showwarning, warnings.filters[:]
        warnings.filterwarnings("always", message=SYNC_WARNING)

        def show(message, category, filename, lineno, *a, **k):
            if SYNC_WARNING in str(message):
                where = f"{Path(filename).name}:{lineno}"
                self.syncs[where] = self.syncs.get(where, 0) + 1
            else:
                self._saved[0](message, category, filename, lineno, *a, **k)

        warnings.showwarning = show

    def _unhook(self):
        warnings.showwarning, warnings.filters[:] = self._saved

    def safe_gaps(self, cuda: bool) -> dict:
        try:  # a private profiler API: its failure must not cost the variant's figures
            return self.gaps(cuda)
        except Exception as e:
            return {"error": repr(e)[:300]}

    def gaps(self, cuda: bool) -> dict:
        """Where the GPU waits: the idle time between its (merged) kernels, grouped by the kernels
        on either side of each gap. Gaps at a step's start say the host did per-step work the
        GPU had to wait for; gaps spread through forward/backward say the launches were slower
        than the kernels."""
        want = "cuda" if cuda else "cpu"
        ev = sorted((e.start_ns(), e.start_ns() + e.duration_ns(), short(e.name()))
                    for e in self.prof.profiler.kineto_results.events()
                    if str(e.device_type()).lower().endswith(want) and e.duration_ns() > 0)
        where: dict[str, list] = {}
        idle, end, last = 0.0, None, None
        for s0, s1, name in ev:
            if end is not None and s0 - end > 20_000:  # ignore the launch-to-launch jitter (< 20 us)
                gap = (s0 - end) / 1e6
                idle += gap
                w = where.setdefault(f"{last} -> {name}", [0.0, 0])
                w[0], w[1] = w[0] + gap, w[1] + 1
            if end is None or s1 > end:
                end, last = s1, name
        top = sorted(where.items(), key=lambda kv: -kv[1][0])[:10]
        # Each memset is a launch (and a gap) of its own: which kernels they are made for.
        memsets: dict[str, int] = {}
        for (_, _, name), (_, _, nxt) in zip(ev, ev[1:]):
            if name.startswith("Memset"):
                memsets[nxt] = memsets.get(nxt, 0) + 1
        out = {"idle_ms_per_step_over_20us": round(idle / self.n, 2),
               "kernels_per_step": len(ev) // self.n,
               "top": [(round(ms / self.n, 3), round(c / self.n, 1), k) for k, (ms, c) in top],
               "memsets_before": [(round(c / self.n, 1), k) for k, c in
                                  sorted(memsets.items(), key=lambda kv: -kv[1])[:8]]}
        comm = merged((s0, s1) for s0, s1, name in ev if "nccl" in name.lower())
        if comm:
            # Under DDP: how long NCCL's kernels run, and for how much of that nothing else runs
            # (an all-reduce nothing overlaps, e.g. the last bucket's after the backward), the
            # rest being time they share the SMs with compute.
            work = merged((s0, s1) for s0, s1, name in ev if "nccl" not in name.lower())
            out["comm_ms_per_step"] = round(length(comm) / 1e6 / self.n, 2)
            out["comm_alone_ms_per_step"] = round(
                (length(comm) - length(overlap(comm, work))) / 1e6 / self.n, 2)
        return out

    def step_end(self, step: int):  # `step` = steps done
        if self.prof is None or step != self.start + self.n:
            return
        cuda = self.cuda
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0)
        wall = time.perf_counter() - self.t0
        if self.sync_debug:
            self._unhook()
        self.prof.__exit__(None, None, None)
        kinds: dict[str, float] = {}
        top = []
        for e in self.prof.key_averages():
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            if us <= 0:
                continue
            name = e.key.lower()
            kind = next((k for k, subs in KERNEL_KINDS if any(x in name for x in subs)), "other")
            kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / self.n
            top.append((us / 1e3 / self.n, e.count // self.n, e.key[:90]))
        busy = sum(kinds.values())
        self.summary = {"wall_ms_per_step": round(wall * 1e3 / self.n, 2),
                        "gpu_busy_ms_per_step": round(busy, 2),
                        "idle_gaps": self.safe_gaps(cuda),
                        "ms_per_step_by_kind": {k: round(v, 2) for k, v in sorted(
                            kinds.items(), key=lambda kv: -kv[1])},
                        "top_kernels": [(round(ms, 3), c, k) for ms, c, k in sorted(top)[::-1][:25]],
                        "syncs": self.syncs}
        self.prof = None


def convert_float8(model, recipe: str, skip: tuple[str, ...] = ()) -> None:
    """torchao float8 training (recipe tensorwise or rowwise) for the Linear layers whose sides are
    multiples of 16, except those named in `skip` (e.g. lm_head); in place, weights unchanged.
    Measured slower at this shape (bench/RESULTS_GPU.md), so it is a benchmark variant, not a
    train param."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def keep(mod, fqn):
        return (fqn.rsplit(".", 1)[-1] not in skip and mod.in_features % 16 == 0
                and mod.out_features % 16 == 0)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=keep)


def make_model(tok, shape: dict, seed: int):
    torch.manual_seed(seed)
    m = params.Model(**shape)
    return build_scratch(m, tok, shape["context_length"])


def engine_batches(n: int, batch: int, seed: int):
    """The engine's batches of block indices (engine.Order, one rank), so both loops see the same
    data and their loss curves compare step by step."""
    return iter(engine.Order(n, batch, 1, 0, seed))


def baseline(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
             warmup: int, mode: str = "default", probe: Probe | None = None) -> dict:
    """The plain loop: bf16 autocast, torch.compile, fused AdamW, no framework."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev).train()
    cmodel = torch.compile(model, mode=mode) if dev == "cuda" else model
    graphs = mode in ("reduce-overhead", "max-autotune")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.95), fused=dev == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(1, steps - warmup)))))
    batches = engine_batches(len(blocks), batch, seed)
    losses, times = [], []
    t_prev, acc, n = None, None, 0
    for step in range(steps):
        idx = next(batches)
        if probe:
            probe.step_begin(step)
        x = blocks[idx].to(dev, non_blocking=True)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = cmodel(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if probe:
            probe.step_end(done)
        acc, n = (loss.detach() if n == 0 else acc + loss.detach()), n + 1
        # Logged like the Trainer logs: the mean since the last log, at step 1 and every 10th,
        # so the two curves compare at the same steps.
        if done == 1 or done % 10 == 0 or done == steps:
            losses.append((done, (acc / n).item()))  # .item() syncs: once per 10 steps
            n = 0
            if done == 1 or done % 50 == 0:
                print(f"  baseline step {done} loss {losses[-1][1]:.3f} {time.strftime('%T')}",
                      flush=True)
            now = time.perf_counter()
            if t_prev is not None:
                times.append((done, (now - t_prev[1]) / (done - t_prev[0])))
            t_prev = (done, now)
    return {"losses": losses, "step_times": times}


def run_engine(model, blocks, val, steps, batch, lr, seed, warmup, out_dir, overrides,
               probe: Probe | None = None) -> dict:
    """The engine with params' defaults and `overrides` (train keys; train.engine levers as
    engine.NAME, e.g. engine.fused_proj:off). Bench-only settings: float8:tensorwise|rowwise with
    float8_skip:lm_head/..., inductor:SETTING/SETTING=0 (inductor booleans), blas:cublaslt."""
    if "float8" in overrides:
        convert_float8(model, overrides.pop("float8"),
                       tuple(x for x in overrides.pop("float8_skip", "").split("/") if x))
    import torch._inductor.config

    inductor = {k: v != "0" for k, _, v in (x.partition("=") for x in overrides.pop("inductor", "").split("/")
                                            if x)}
    blas = overrides.pop("blas", None)
    train = dict(block_size=blocks.shape[1], batch_size=batch, lr=lr, warmup_steps=warmup,
                 max_steps=steps, eval_every=10**6, save_every=10**6, log_every=10, eval_batches=1)
    levers = {k.removeprefix("engine."): v for k, v in overrides.items() if k.startswith("engine.")}
    train.update({k: v for k, v in overrides.items() if not k.startswith("engine.")})
    t = params.Train(**train, engine=levers)
    # Settings torch reads once per process: this variant's process is its own (each_in_own_process).
    env = transforms.process_env(t, engine.sharded(t))
    for k, v in env.items():
        os.environ.setdefault(k, v)
    changes = contextlib.ExitStack()
    changes.enter_context(torch._inductor.config.patch(inductor))
    if blas:
        changes.callback(torch.backends.cuda.preferred_blas_library,
                         torch.backends.cuda.preferred_blas_library())
        torch.backends.cuda.preferred_blas_library(blas)

    def on_step(step):
        if probe:
            probe.step_end(step)
            probe.step_begin(step)

    with changes:
        out = engine.train(model, blocks, val, t, seed=seed, out_dir=out_dir, on_step=on_step)
    hist = out.state.log_history
    losses = [(h["step"], h["loss"]) for h in hist if "loss" in h]
    # The engine's logged rate is the GPU's time between logs (CUDA events): as exact as the plain
    # loop's host clock at its synchronising logs.
    tokens_per_step = batch * blocks.shape[1] * engine.world()[1]
    times = [(h["step"], tokens_per_step / h["tokens_per_s"]) for h in hist if h.get("tokens_per_s")]
    return {"losses": losses, "step_times": times, "result": out.result.as_dict(),
            "env": env}


def steady(step_times, skip: int) -> float:
    xs = [t for s, t in step_times if s > skip]
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--tokens", default="data/tokens", help="the tokenize stage's shards")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--skip", type=int, default=50, help="steps excluded from timing (compile, warm-up)")
    ap.add_argument("--variants", default="baseline,engine",
                    help="comma list of NAME[=key:value+key:value]: baseline (the plain loop; "
                         "key mode = its compile mode, causal:1 = with the engine's causal "
                         "attention), engine* (the engine with params' defaults, the given train "
                         "keys overridden, train.engine levers as engine.NAME; see run_engine), "
                         "e.g. engine-model-loss=engine.loss:model,engine-noproj=engine.fused_proj:off")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile N steps after --skip: GPU kernel time by kind, busy share")
    ap.add_argument("--sync-debug", action="store_true",
                    help="with --profile: count host-GPU synchronisations in those steps, by line")
    ap.add_argument("--baseline-from", metavar="JSON",
                    help="the plain loop's row from an earlier run's --out (same data, shape, steps), for "
                         "settings read once per process (e.g. CUBLAS_WORKSPACE_CONFIG) that the engine's "
                         "process has and the plain loop's must not")
    ap.add_argument("--out", default="bench/out/train_gpu.json")
    ap.add_argument("--one-process", action="store_true",
                    help="run every variant in this process; by default each runs in a process of its own "
                         "(settings torch reads once per process, like cuBLAS's workspace, and compile "
                         "caches are then the variant's own)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU to check the code")
    args = ap.parse_args()
    if os.environ.get("BENCH_STACKS"):  # a run that seems stuck shows where, every N seconds
        import faulthandler
        faulthandler.dump_traceback_later(int(os.environ["BENCH_STACKS"]), repeat=True)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("no CUDA GPU: running the tiny --cpu-smoke shape (the figures mean nothing here)")
        args.cpu_smoke = True

    rank, ws = engine.world()
    if ws > 1:  # under torchrun: engine variants only, as DDP; rank 0 reports (global tokens/s)
        import torch.distributed as dist
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if rank:
            sys.stdout = open(os.devnull, "w")
    specs = args.variants.split(",")
    if len(specs) > 1 and ws == 1 and not args.one_process:
        finish(each_in_own_process(specs, args), args, rank)
        return
    shape = dict(n_layers=12, hidden_size=768, n_heads=12, n_kv_heads=12, intermediate_size=2048,
                 context_length=args.seq)
    if args.cpu_smoke:
        shape.update(n_layers=1, hidden_size=64, n_heads=2, n_kv_heads=2, intermediate_size=128)
        args.steps, args.batch, args.skip = min(args.steps, 30), min(args.batch, 2), 5
    seed = 1337
    tok = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    # In memory, as the plain loop indexes them with a tensor; the engine gets the same blocks.
    blocks = torch.from_numpy(TokenBlocks(args.tokens, "train", args.seq).all())
    val = torch.from_numpy(TokenBlocks(args.tokens, "val", args.seq).all()[:8])
    print(f"data: {len(blocks)} train blocks of {args.seq} ({len(blocks) * args.seq / 1e6:.1f}M tokens),"
          f" vocab {len(tok)}, read in {time.perf_counter() - t0:.0f}s", flush=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = {}
    for spec in specs:
        v, _, kv = spec.partition("=")
        overrides = dict(item.split(":", 1) for item in kv.split("+") if item)
        if ws > 1 and v.startswith("baseline"):
            print(f"{v}: skipped (the plain loop runs on one GPU only)")
            continue
        # Dynamo would reuse the previous variant's compiled graph for the new model (its guards
        # check the module's type, not which one): choices made while tracing, like the attention
        # kernel, would then be the first variant's.
        torch._dynamo.reset()
        model = make_model(tok, shape, seed)
        fpt = flops_per_token(model, args.seq)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        probe = Probe(args.skip, args.profile, args.sync_debug)
        print(f"{v}: start {time.strftime('%T')}", flush=True)
        try:
            if v.startswith("baseline"):
                # causal:1 gives the plain loop the engine's causal attention (a fair comparison)
                if overrides.get("causal"):
                    transforms.optimize(model, transforms.Plan("cuda", "bf16", causal_attention=True),
                                        args.seq)
                r = baseline(model, blocks, args.steps, args.batch, args.lr, seed,
                             args.warmup, mode=overrides.get("mode", "default"), probe=probe)
            else:
                r = run_engine(model, blocks, val, args.steps, args.batch, args.lr, seed,
                               args.warmup, Path(f"/tmp/bench_engine_{v}"), dict(overrides),
                               probe=probe)
        except Exception as e:  # one variant failing must not lose the others' numbers
            print(f"{v}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        step_s = steady(r["step_times"], args.skip)
        tps = args.batch * args.seq * ws / step_s
        r.update(variant=v, overrides=overrides, pid=os.getpid(), wall_s=round(time.perf_counter() - t0, 1),
                 tokens_per_s=round(tps),
                 mfu=round(tps / ws * fpt / H100_BF16_PEAK, 4), flops_per_token=fpt,
                 params=sum(p.numel() for p in model.parameters()),
                 peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
                 if torch.cuda.is_available() else None)
        if probe.summary:
            r["profile"] = probe.summary
            ps = probe.summary
            print(f"{v:14s} profile: wall {ps['wall_ms_per_step']} ms/step, GPU busy "
                  f"{ps['gpu_busy_ms_per_step']} ms: {ps['ms_per_step_by_kind']}; syncs/step "
                  f"{ {k: n / args.profile for k, n in ps['syncs'].items()} }; idle "
                  f"{ps['idle_gaps'].get('idle_ms_per_step_over_20us')} ms/step, top gaps "
                  f"{ps['idle_gaps'].get('top', ps['idle_gaps'])[:3]}"
                  + f"; memsets before {ps['idle_gaps'].get('memsets_before', [])[:4]}"
                  + (f"; NCCL {ps['idle_gaps']['comm_ms_per_step']} ms/step, alone "
                     f"{ps['idle_gaps']['comm_alone_ms_per_step']}" if "comm_ms_per_step" in ps["idle_gaps"]
                     else ""), flush=True)
        rows[v] = r
        if rank == 0:  # partial results survive a timeout
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"partial": True, "rows": rows}, default=str))
        print(f"{v:14s} {tps:12,.0f} tok/s  MFU {r['mfu']:.1%}  peak {r['peak_mem_gib']} GiB  "
              f"final loss {r['losses'][-1][1]:.3f}  wall {r['wall_s']}s", flush=True)
        del model
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()
              if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "shape": shape,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "world_size": ws,
              "rows": rows}
    finish(report, args, rank)


def each_in_own_process(specs: list[str], args) -> dict:
    """Runs this script once per variant (the same arguments, that variant alone) and merges
    their reports' rows in order; a variant whose process fails is reported and skipped."""
    import subprocess

    report: dict = {"rows": {}}
    for i, spec in enumerate(specs):
        part = Path(f"{args.out}.part{i}")
        part.unlink(missing_ok=True)
        # argparse keeps an option's last value: these override the parent's.
        rc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variants", spec, "--out", part,
                             "--baseline-from", "", "--one-process"]).returncode
        if not part.exists():
            print(f"{spec.partition('=')[0]}: FAILED its process exited {rc} without a report", flush=True)
            continue
        child = json.loads(part.read_text())
        part.unlink()
        report = {**child, "rows": {**report["rows"], **child["rows"]}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"partial": True, "rows": report["rows"]}, default=str))
    return report


def finish(report: dict, args, rank: int) -> None:
    """The ratios to the plain loop (this run's, or --baseline-from's) and the report file."""
    rows, steps = report["rows"], report.get("steps", args.steps)  # --cpu-smoke caps the steps
    if args.baseline_from and "baseline" not in rows:
        rows["baseline"] = dict(json.loads(Path(args.baseline_from).read_text())["rows"]["baseline"],
                                from_file=args.baseline_from)
    if "baseline" in rows:
        base = rows["baseline"]
        idle = base.get("profile", {}).get("idle_gaps", {}).get("idle_ms_per_step_over_20us") or 0
        if idle > 1.0:  # seen on some hosts (RESULTS_GPU.md §1h call 5, §1i call 2)
            print(f"warning: the plain loop's GPU idled {idle} ms a step waiting for the host: "
                  "the ratios below flatter the engine; rerun for a clean baseline")
        for v, r in rows.items():
            if v == "baseline":
                continue
            r["ratio_vs_baseline"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            # Loss curves: mean absolute gap over the second half of training, on logged steps.
            b = dict(base["losses"])
            common = [(s, loss, b[s]) for s, loss in r["losses"] if s in b and s > steps // 2]
            gap = statistics.mean(abs(a - c) for _, a, c in common) if common else float("nan")
            r["loss_gap_second_half"] = round(gap, 4)
            print(f"{v}: {r['ratio_vs_baseline']:.2f}x baseline; mean |loss gap| over steps "
                  f"{steps // 2}-{steps}: {gap:.3f} (final {r['losses'][-1][1]:.3f} vs "
                  f"{base['losses'][-1][1]:.3f})")
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
