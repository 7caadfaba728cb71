"""The engine (codex_ml/training/engine.py) vs a plain PyTorch loop: tokens/s on the same model, data and batch, one run.

    .venv/bin/python bench/bench_train_cpu.py [--steps 30] [--rounds 2] [--compile]

Both sides start from the same initial weights and see the same batches; each runs `--rounds`
times alternately (the machine may be shared), and the best round of each is compared. The first
`--warmup` steps of every run are excluded from the timing.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import get_scheduler  # noqa: E402

from codex_ml.params import Model, Train  # noqa: E402
from codex_ml.training import engine  # noqa: E402


class _Vocab:
    """Enough of a tokenizer for build_scratch: a size and special ids."""

    def __init__(self, n):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 1, 2, 0

    def __len__(self):
        return self.n


class _Timer:
    """engine.train's on_step: the time from the end of step `warmup` to the end of the run."""

    def __init__(self, warmup):
        self.warmup, self.t, self.end = warmup, None, None

    def __call__(self, step):
        if step == self.warmup:
            self.t = time.perf_counter()
        self.end = time.perf_counter()

    @property
    def elapsed(self):
        return self.end - self.t


def plain_loop(model, blocks, t: Train, steps: int, warmup: int) -> float:
    """The minimal loop a user would write: AdamW, the same schedule, clipping; fp32 on CPU."""
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))
    sched = get_scheduler(t.scheduler, opt, num_warmup_steps=t.warmup_steps, num_training_steps=steps)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=g)
    start = None
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        for micro in range(t.grad_accum):
            i = (step * t.grad_accum + micro) * t.batch_size
            x = blocks[order[i: i + t.batch_size]]
            loss = model(input_ids=x, labels=x).loss / t.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides")
    ap.add_argument("--loss", default="auto", choices=["auto", "fused", "model"],
                    help="the engine's train.engine.loss (auto = the model's own on a CPU)")
    a = ap.parse_args()

    m, t = Model(), Train()  # the default profile's shapes
    t = Train(**{**t.model_dump(), **dict(eval_every=10**6, save_every=10**6, log_every=10**6,
                                          eval_batches=1),
                 "engine": {"compile": "on" if a.compile else "off", "loss": a.loss}})
    torch.manual_seed(0)
    from codex_ml.modeling import build_scratch
    base = build_scratch(m, _Vocab(a.vocab), t.block_size)
    n_params = sum(p.numel() for p in base.parameters())
    need = (a.steps + 1) * t.batch_size * t.grad_accum
    blocks = torch.randint(3, a.vocab, (need, t.block_size), generator=torch.Generator().manual_seed(1))
    tokens = (a.steps - a.warmup) * t.batch_size * t.grad_accum * t.block_size
    print(f"model {n_params/1e6:.2f}M params, batch {t.batch_size}x{t.block_size}, accum {t.grad_accum}, "
          f"{a.steps} steps ({a.warmup} warm-up), threads {torch.get_num_threads()}, "
          f"compile {a.compile}, loss {a.loss}", flush=True)

    best = {"engine": math.inf, "plain": math.inf}
    for r in range(a.rounds):
        model = copy.deepcopy(base)
        timer = _Timer(a.warmup)
        with tempfile.TemporaryDirectory() as d:
            engine.train(model, blocks, blocks[:1], t, seed=0, out_dir=d, max_steps=a.steps,
                         on_step=timer)
        best["engine"] = min(best["engine"], timer.elapsed)
        model = copy.deepcopy(base)
        if a.compile:
            model = torch.compile(model)
        best["plain"] = min(best["plain"], plain_loop(model, blocks, t, a.steps, a.warmup))
        print(f"round {r + 1}: engine {tokens / timer.elapsed:,.0f} tok/s, "
              f"plain {tokens / best['plain']:,.0f} tok/s (best so far)", flush=True)
    e, p = tokens / best["engine"], tokens / best["plain"]
    print(f"engine tokens/s {e:,.0f}  plain loop tokens/s {p:,.0f}  ratio engine/plain {e / p:.3f}")


if __name__ == "__main__":
    main()
