"""GPU throughput of the train stage's own engine against a plain compiled PyTorch loop.

Both train the same GPT-2-small-shaped Llama decoder (12 layers, width 768, 12 heads, context 1024,
vocab ~50k) on the same packed real data, same seed, same batch, in one run. Prints tokens/s,
MFU (nanoGPT's formula), the engine/baseline ratio, peak memory, and whether the loss curves agree.

    python bench/bench_train_gpu.py --tokenizer models/tokenizer --splits data/splits
    python bench/bench_train_gpu.py --cpu-smoke          # a tiny shape on the CPU, to check the code

The engine is called through codex_ml.training.engine.train: the stage's code path, not a copy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import params  # noqa: E402
from codex_ml.modeling import build_scratch, load_tokenizer  # noqa: E402
from codex_ml.training import engine  # noqa: E402
from codex_ml.training.data import pack_split  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM, nanoGPT's MFU denominator


def flops_per_token(model, seq: int) -> float:
    c = model.config
    n = sum(p.numel() for p in model.parameters())  # Llama has no position embeddings to drop
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * (
        c.hidden_size // c.num_attention_heads) * seq


def make_model(tok, shape: dict, seed: int):
    torch.manual_seed(seed)
    m = params.Model(**shape)
    return build_scratch(m, tok, shape["context_length"])


def baseline(model, blocks: torch.Tensor, steps: int, batch: int, lr: float, seed: int,
             warmup: int, mode: str = "default") -> dict:
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
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=g)
    losses, times = [], []
    t_prev = None
    for step in range(steps):
        idx = order[(step * batch) % len(order):][:batch]
        if len(idx) < batch:
            idx = order[:batch]
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
        if step % 10 == 0 or step == steps - 1:
            losses.append((step + 1, loss.item()))  # .item() syncs: once per 10 steps
            now = time.perf_counter()
            if t_prev is not None:
                times.append((step + 1, (now - t_prev[1]) / (step + 1 - t_prev[0])))
            t_prev = (step + 1, now)
    return {"losses": losses, "step_times": times}


def run_engine(model, blocks, val, steps, batch, lr, seed, warmup, out_dir, overrides) -> dict:
    t = params.Train(block_size=blocks.shape[1], batch_size=batch, lr=lr, warmup_steps=warmup,
                     max_steps=steps, eval_every=10**6, save_every=10**6, log_every=10,
                     eval_batches=1, **overrides)
    from transformers import TrainerCallback

    marks = []

    class Clock(TrainerCallback):
        # Logging syncs the device (the loss is read), so the host clock at each log is exact.
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                marks.append((state.global_step, time.perf_counter()))

    trainer, res = engine.train(model, blocks, val, t, seed=seed, out_dir=out_dir,
                                callbacks=[Clock()])
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    times = [(s1, (t1 - t0) / (s1 - s0)) for (s0, t0), (s1, t1) in zip(marks, marks[1:]) if s1 > s0]
    return {"losses": losses, "step_times": times, "result": res.as_dict()}


def steady(step_times, skip: int) -> float:
    xs = [t for s, t in step_times if s > skip]
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--skip", type=int, default=50, help="steps excluded from timing (compile, warm-up)")
    ap.add_argument("--variants", default="baseline,engine",
                    help="comma list of NAME[=key:value+key:value]: baseline (the plain loop; "
                         "key mode = its compile mode), engine* (the engine with params' defaults, "
                         "the given train.* keys overridden), e.g. "
                         "engine-nocg=compile_mode:default+attention:cudnn")
    ap.add_argument("--out", default="bench/out/train_gpu.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU to check the code")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("no CUDA GPU: running the tiny --cpu-smoke shape (the figures mean nothing here)")
        args.cpu_smoke = True

    shape = dict(n_layers=12, hidden_size=768, n_heads=12, n_kv_heads=12, intermediate_size=2048,
                 context_length=args.seq)
    if args.cpu_smoke:
        shape.update(n_layers=1, hidden_size=64, n_heads=2, n_kv_heads=2, intermediate_size=128)
        args.steps, args.batch, args.skip = min(args.steps, 30), min(args.batch, 2), 5
    seed = 1337
    tok = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    blocks = pack_split(args.splits, "train", tok, args.seq)
    val = pack_split(args.splits, "val", tok, args.seq)[:8]
    print(f"data: {len(blocks)} train blocks of {args.seq} ({len(blocks) * args.seq / 1e6:.1f}M tokens),"
          f" vocab {len(tok)}, packed in {time.perf_counter() - t0:.0f}s", flush=True)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = {}
    for spec in args.variants.split(","):
        v, _, kv = spec.partition("=")
        overrides = dict(item.split(":", 1) for item in kv.split("+") if item)
        model = make_model(tok, shape, seed)
        fpt = flops_per_token(model, args.seq)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            if v.startswith("baseline"):
                r = baseline(model, blocks, args.steps, args.batch, args.lr, seed, args.warmup,
                             mode=overrides.get("mode", "default"))
            else:
                r = run_engine(model, blocks, val, args.steps, args.batch, args.lr, seed,
                               args.warmup, Path(f"/tmp/bench_engine_{v}"), overrides)
        except Exception as e:  # one variant failing must not lose the others' numbers
            print(f"{v}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        step_s = steady(r["step_times"], args.skip)
        tps = args.batch * args.seq / step_s
        r.update(variant=v, overrides=overrides, wall_s=round(time.perf_counter() - t0, 1), tokens_per_s=round(tps),
                 mfu=round(tps * fpt / H100_BF16_PEAK, 4), flops_per_token=fpt,
                 params=sum(p.numel() for p in model.parameters()),
                 peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
                 if torch.cuda.is_available() else None)
        rows[v] = r
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # partial results survive a timeout
        Path(args.out).write_text(json.dumps({"partial": True, "rows": rows}, default=str))
        print(f"{v:14s} {tps:12,.0f} tok/s  MFU {r['mfu']:.1%}  peak {r['peak_mem_gib']} GiB  "
              f"final loss {r['losses'][-1][1]:.3f}  wall {r['wall_s']}s", flush=True)
        del model
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name()
              if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "shape": shape,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "rows": rows}
    if "baseline" in rows:
        base = rows["baseline"]
        for v, r in rows.items():
            if v == "baseline":
                continue
            r["ratio_vs_baseline"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            # Loss curves: mean absolute gap over the second half of training, on logged steps.
            b = dict(base["losses"])
            common = [(s, loss, b[s]) for s, loss in r["losses"] if s in b and s > args.steps // 2]
            gap = statistics.mean(abs(a - c) for _, a, c in common) if common else float("nan")
            r["loss_gap_second_half"] = round(gap, 4)
            print(f"{v}: {r['ratio_vs_baseline']:.2f}x baseline; mean |loss gap| over steps "
                  f"{args.steps // 2}-{args.steps}: {gap:.3f} (final {r['losses'][-1][1]:.3f} vs "
                  f"{base['losses'][-1][1]:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
