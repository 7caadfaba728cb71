"""train_model: packing, the engine (codex_ml/training/engine.py: its loop, data order, logs,
checkpoints, evaluation) and its speed levers (transforms.py) on the CPU, checkpoints that resume
after kill -9, two CPU ranks (DDP, FSDP), the stage's outputs. The CUDA-only paths are in
tests/test_gpu.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from codex_ml import io
from codex_ml.params import Params
from codex_ml.tokenizer import FIM_TOKENS
from codex_ml.training import adamw, checkpoints, engine, transforms
from codex_ml.training.data import pack

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=2, intermediate_size=64,
                  context_length=32)
TINY_TRAIN = dict(block_size=32, batch_size=4, lr=3e-3, warmup_steps=2, max_steps=20,
                  eval_every=10, save_every=10, log_every=5, eval_batches=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes OpenMP spin-waits costly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stdlib_texts(n: int, max_chars: int = 4000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "fnmatch.py",
             "colorsys.py", "bisect.py", "heapq.py", "glob.py", "string.py", "keyword.py",
             "copy.py", "base64.py", "calendar.py", "csv.py", "difflib.py", "gettext.py",
             "ipaddress.py", "netrc.py", "numbers.py", "operator.py", "pprint.py", "queue.py"]
    return [(root / n).read_text()[:max_chars] for n in names[:n]]


def make_tokenizer(path: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>", *FIM_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # The FIM sentinels as the pipeline's own tokenizer has them (train.fim is on by default).
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>", extra_special_tokens=list(FIM_TOKENS),
                            split_special_tokens=True).save_pretrained(path)
    return path


def write_split(d: Path, name: str, texts: list[str]) -> None:
    rows = [dict(id=io.sha256_text(t), source="stdlib", path=f"{i}.py", lang="python", text=t,
                 bytes=len(t.encode())) for i, t in enumerate(texts)]
    pq.write_table(pa.Table.from_pylist(rows, schema=io.DOC_SCHEMA), d / f"{name}.parquet")


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A repo-shaped directory: data/splits (train/val/test + manifest) and models/tokenizer."""
    root = tmp_path_factory.mktemp("train_ws")
    texts = stdlib_texts(23)
    splits = root / "data" / "splits"
    splits.mkdir(parents=True)
    write_split(splits, "train", texts[:19])
    write_split(splits, "val", texts[19:21])
    write_split(splits, "test", texts[21:])
    (splits / "manifest.json").write_text(json.dumps({"dataset_version": "test-v1"}))
    make_tokenizer(root / "models" / "tokenizer", texts[:19])
    make_tokens(root, root / "models" / "tokenizer")
    return root


def make_tokens(root: Path, tokenizer: Path, out: Path | None = None) -> Path:
    """The tokenize stage's shards of root/data/splits (into root/data/tokens by default)."""
    from codex_ml.data.engine import Engine
    from codex_ml.data.tokens import tokenize

    out = out or root / "data" / "tokens"
    tokenize(root / "data" / "splits", tokenizer, out, 1 << 28, Engine(workers=1))
    return out


def params(**over) -> Params:
    raw = {"seed": 7, "model": dict(TINY_MODEL), "train": dict(TINY_TRAIN)}
    for group, vals in over.items():
        raw[group].update(vals)
    return Params.model_validate(raw)


def tiny_blocks(workspace):
    """The workspace's tokenizer and its train and val shards in 32-token blocks, in memory."""
    from codex_ml import modeling
    from codex_ml.data.tokens import TokenBlocks

    tok = modeling.load_tokenizer(workspace / "models" / "tokenizer")
    tokens = workspace / "data" / "tokens"
    return (tok, torch.from_numpy(TokenBlocks(tokens, "train", 32).all()),
            torch.from_numpy(TokenBlocks(tokens, "val", 32).all()))


TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, use_cache=False)


def tiny_llama(**config):
    """A 2-layer transformers Llama built directly (no tokenizer), for the engine's model hooks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))


def test_pack_puts_eos_between_docs_and_drops_the_remainder(workspace):
    from codex_ml.modeling import load_tokenizer

    tok = load_tokenizer(workspace / "models" / "tokenizer")
    docs = ["def a():\n    return 1\n", "x = 2\n", "class B:\n    pass\n"] * 200
    setting = os.environ.get("TOKENIZERS_PARALLELISM")
    blocks = pack(docs, tok, 8)  # with the tokenizer's threads: the same ids as one at a time
    assert os.environ.get("TOKENIZERS_PARALLELISM") == setting
    flat = sum((tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs), [])
    assert blocks.shape == (len(flat) // 8, 8)
    assert blocks.flatten().tolist() == flat[: blocks.numel()]
    assert (blocks == tok.eos_token_id).sum() >= 2




def train_tiny(workspace, tmp_path, seed_offset: int = 0, **train):
    """engine.train on the workspace's tiny model (built from the seed) -> engine.Trained."""
    from codex_ml import modeling

    kw = {k: train.pop(k) for k in ("resume_from", "live", "on_step", "fingerprint") if k in train}
    p = params(train=dict(dict(save_every=1000, eval_every=1000), **train))
    tok, tr, va = tiny_blocks(workspace)
    torch.manual_seed(p.seed + seed_offset)
    model = modeling.build(p.model, tok, 32)
    return engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path, **kw)


def same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_tiny_model_trains_loss_falls_and_is_deterministic(workspace, tmp_path):
    runs = [train_tiny(workspace, tmp_path / str(run), max_steps=30) for run in range(2)]
    for out in runs:
        res, hist = out.result, out.state.log_history
        losses = [h["loss"] for h in hist if "loss" in h]
        assert res.steps == 30 and res.start_step == 0 and res.tokens == 30 * 4 * 32
        assert losses[-1] < losses[0] - 0.5, losses
        assert res.final_val_loss < 5.5  # ln(400) = 6.0 for a uniform guess
        assert (res.precision, res.compiled, res.loss, res.world_size) == ("fp32", False, "model", 1)
        assert out.state_dict is None  # FSDP only
        assert next(out.model.parameters()).dtype == torch.float32
    same_weights(runs[0].model, runs[1].model)  # same data, params and seed: same weights on CPU
    assert runs[0].state.log_history[-1].keys() == {"step", "eval_loss"}


def test_logs_give_each_log_steps_mean_loss_norm_and_rate_in_order(workspace, tmp_path):
    """A log every 2 steps: its loss is the mean of the per-step losses since the previous log
    (those of a run logging every step: the logs change nothing that is computed), its norm and
    learning rate the step's own; the log at each step comes before that step's evaluation; a
    checkpoint's state holds the history up to its step."""
    every = train_tiny(workspace, tmp_path / "1", max_steps=7, log_every=1, eval_every=5, save_every=5)
    two = train_tiny(workspace, tmp_path / "2", max_steps=7, log_every=2, eval_every=5, save_every=5)
    same_weights(every.model, two.model)
    one = {h["step"]: h for h in every.state.log_history if "loss" in h}
    hist = two.state.log_history
    assert [(h["step"], "loss" in h) for h in hist] == [
        (1, True), (2, True), (4, True), (5, False), (6, True), (7, True), (7, False)]
    prev = 0
    for h in hist:
        if "loss" not in h:
            continue
        s = h["step"]
        assert h["loss"] == pytest.approx(sum(one[i]["loss"] for i in range(prev + 1, s + 1)) / (s - prev),
                                          rel=1e-6), s
        assert h["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=1e-6)
        assert h["learning_rate"] == one[s]["learning_rate"] and h["epoch"] == one[s]["epoch"]
        assert s == 1 or h["tokens_per_s"] > 0
        prev = s
    assert [h["step"] for h in one.values()] == list(range(1, 8))
    # warmup 2 then cosine: the step's own rate before its scheduler step
    assert one[1]["learning_rate"] == 0.0 and one[2]["learning_rate"] == pytest.approx(1.5e-3)
    saved = torch.load(tmp_path / "2" / "checkpoint-5" / engine.STATE, weights_only=True)
    assert saved["state"]["log_history"] == hist[:4] and saved["state"]["step"] == 5
    assert two.result.final_train_loss == hist[-2]["loss"]
    assert two.result.final_val_loss == hist[-1]["eval_loss"]
    assert two.result.best_val_loss == min(hist[3]["eval_loss"], hist[6]["eval_loss"])


def test_logs_records_without_deferral(monkeypatch):
    """engine.Logs on the host (deferred=False): each add is emitted at once, loss = the summed
    loss over the steps since the last log, tokens/s from the host clock since the previous log
    or restart; no norm, no grad_norm key. (The deferred path, CUDA only: tests/test_gpu.py.)"""
    clock = iter([10.0, 10.5, 11.5, 20.0, 21.0])
    monkeypatch.setattr(engine.time, "perf_counter", lambda: next(clock))
    recs = []
    logs = engine.Logs(False, 128, recs.append)
    logs.restart(0)                                                      # 10.0
    logs.add(2, torch.tensor(6.0), 2, torch.tensor(0.5), 1e-3, 0.123456)  # 10.5: 2 steps
    logs.add(3, torch.tensor(1.5), 1, None, 2e-3, 0.2)                   # 11.5: 1 step
    logs.restart(3)                                                      # 20.0 (an evaluation)
    logs.add(5, torch.tensor(4.0), 2, torch.tensor(0.25), 3e-3, 0.3)     # 21.0
    assert not logs.pending
    assert recs == [
        {"step": 2, "epoch": 0.1235, "loss": 3.0, "learning_rate": 1e-3, "grad_norm": 0.5,
         "tokens_per_s": 2 * 128 / 0.5},
        {"step": 3, "epoch": 0.2, "loss": 1.5, "learning_rate": 2e-3, "tokens_per_s": 128.0},
        {"step": 5, "epoch": 0.3, "loss": 2.0, "learning_rate": 3e-3, "grad_norm": 0.25,
         "tokens_per_s": 2 * 128 / 1.0}]


def test_resuming_a_checkpoint_at_max_steps_trains_nothing_and_keeps_its_weights(workspace, tmp_path):
    """A rerun that finds the final checkpoint (killed while writing the output, or rerun after a
    code change) must give that checkpoint's weights, not run a step past max_steps."""
    first = train_tiny(workspace, tmp_path, max_steps=12, save_every=6, eval_every=6, fingerprint="f")
    ckpt = checkpoints.find_resumable(tmp_path, "f")
    assert ckpt.name == "checkpoint-12"
    again = train_tiny(workspace, tmp_path, seed_offset=1, max_steps=12, save_every=6, eval_every=6,
                       fingerprint="f", resume_from=ckpt)
    r1, r2 = first.result, again.result
    assert (r2.steps, r2.start_step, r2.tokens_this_run, r2.stopped_early) == (12, 12, 0, False)
    assert r2.final_val_loss == r1.final_val_loss and r2.final_train_loss == r1.final_train_loss
    assert again.state.log_history == first.state.log_history
    same_weights(first.model, again.model)
    assert checkpoints.find_resumable(tmp_path, "f") == ckpt  # nothing new written


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_same_weights(workspace, tmp_path):
    """Stopped (an exception, as a kill) after the checkpoint at step 6 and resumed from it: the
    same data order from micro-batch 6 x grad_accum on, the optimizer, scheduler and RNG states
    restored, so the weights and the history are those of the uninterrupted run, bit for bit."""
    train = dict(max_steps=12, save_every=6, eval_every=6, grad_accum=2, log_every=2)
    full = train_tiny(workspace, tmp_path / "full", **train)

    def crash(step):
        if step == 7:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train_tiny(workspace, tmp_path / "cut", on_step=crash, fingerprint="f", **train)
    ckpt = checkpoints.find_resumable(tmp_path / "cut", "f")
    assert ckpt.name == "checkpoint-6"
    resumed = train_tiny(workspace, tmp_path / "cut", seed_offset=1, resume_from=ckpt, fingerprint="f",
                         **train)
    assert (resumed.result.start_step, resumed.result.steps) == (6, 12)
    assert resumed.result.resumed_from == str(ckpt)
    same_weights(full.model, resumed.model)
    timing = lambda hist: [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in hist]  # noqa: E731
    assert timing(resumed.state.log_history) == timing(full.state.log_history)


def test_checkpoint_roundtrip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    from codex_ml.params import Train

    t = Train(lr=1e-2, warmup_steps=2, max_steps=10)
    plan = transforms.Plan("cpu", "fp32")

    def setup(seed):
        torch.manual_seed(seed)
        model = tiny_llama()
        opt = engine._optimizer(model, t, plan, {})
        return model, opt, engine._scheduler(opt, t, t.max_steps)

    model, opt, sched = setup(0)
    x = torch.randint(0, 64, (2, 16))
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    st = engine.State(step=3, log_history=[{"step": 3, "eval_loss": 2.5}], best_val=2.5)
    d = engine.save_checkpoint(tmp_path, model, opt, sched, st, "fp", keep=2)
    import random

    import numpy as np
    after = (torch.rand(3), random.random(), np.random.rand())
    assert d == tmp_path / "checkpoint-3" and checkpoints.find_resumable(tmp_path, "fp") == d
    assert json.loads((d / checkpoints.MARKER).read_text()) == {"fingerprint": "fp", "step": 3, "val_loss": 2.5}

    model2, opt2, sched2 = setup(1)
    got = engine.load_checkpoint(d, model2, opt2, sched2)
    assert got == st
    assert torch.equal(torch.rand(3), after[0]) and (random.random(), np.random.rand()) == after[1:]
    same_weights(model, model2)
    assert sched2.state_dict() == sched.state_dict() and sched2.get_last_lr() == sched.get_last_lr()
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k, v in s1["state"].items():
        for name in v:
            assert torch.equal(v[name], s2["state"][k][name]), (k, name)
    # the next step is the same
    for m, o in ((model, opt), (model2, opt2)):
        m(input_ids=x, labels=x).loss.backward()
        o.step()
    same_weights(model, model2)


def test_evaluate_is_the_mean_token_loss_over_whole_batches():
    torch.manual_seed(0)
    model = tiny_llama().train()
    val = torch.randint(0, 64, (7, 16))
    plan = transforms.Plan("cpu", "fp32")
    got = engine.evaluate(model, val, 3, plan, torch.device("cpu"))
    assert model.training  # put back
    with torch.no_grad():
        logits = model.eval()(input_ids=val[:6]).logits  # 2 whole batches of 3; the 7th left out
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64).double(),
                                             val[:6, 1:].reshape(-1), reduction="mean")
    assert got == pytest.approx(want.item(), rel=1e-6)


def test_order_resumes_exactly_partitions_ranks_and_holds_a_tensor():
    """engine.Order: starting at micro-batch k gives the batches an uninterrupted order gives from
    k on (across epochs); two ranks' batches k together are one rank's batch k at twice the size
    (disjoint); each epoch a permutation without repeats; the epoch's order kept as an int64 tensor."""
    from itertools import islice

    n, b, seed = 23, 3, 5
    full = list(islice(iter(engine.Order(n, b, 1, 0, seed)), 30))  # 7 per epoch: over 4 epochs
    assert all(len(x) == b for x in full)
    for k in (0, 1, 6, 7, 8, 20):
        assert list(islice(iter(engine.Order(n, b, 1, 0, seed, start=k)), 30 - k)) == full[k:], k
    for e in range(4):
        epoch = sum(full[7 * e: 7 * e + 7], [])
        assert len(set(epoch)) == 21 and set(epoch) <= set(range(n))
    assert full[:7] != full[7:14]  # a new permutation each epoch
    wide = list(islice(iter(engine.Order(n, 2 * b, 1, 0, seed)), 9))  # 3 per epoch
    ranks = [list(islice(iter(engine.Order(n, b, 2, r, seed)), 9)) for r in (0, 1)]
    for k in range(9):
        assert ranks[0][k] + ranks[1][k] == wide[k], k
        assert not set(ranks[0][k]) & set(ranks[1][k])
    it = iter(engine.Order(10**6, 4, 1, 0, seed))
    next(it)
    perm = it.gi_frame.f_locals["perm"]
    assert isinstance(perm, torch.Tensor) and perm.dtype == torch.int64 and perm.numel() == 10**6


def test_a_time_budget_stops_evaluates_and_saves(workspace, tmp_path):
    out = train_tiny(workspace, tmp_path, max_steps=50, max_time_s=1e-3, fingerprint="f")
    res = out.result
    assert (res.steps, res.stopped_early) == (1, True)  # the first step alone takes longer
    assert res.final_val_loss is not None and out.state.log_history[-1]["step"] == 1
    assert checkpoints.find_resumable(tmp_path, "f").name == "checkpoint-1"


def test_early_stopping_after_patience_evaluations_without_a_better_val_loss(workspace, tmp_path,
                                                                            monkeypatch):
    """Patience 2, one evaluation a step, val losses 3.0, 2.0, 2.5, 2.6: stopped at step 4, where
    the final checkpoint is saved without evaluating step 4 a second time."""
    vals = iter([3.0, 2.0, 2.5, 2.6, 9.9])
    monkeypatch.setattr(engine, "evaluate", lambda *a: next(vals))
    out = train_tiny(workspace, tmp_path, max_steps=20, eval_every=1, save_every=1000,
                     early_stopping_patience=2, fingerprint="f")
    res, st = out.result, out.state
    assert (res.steps, res.stopped_early, res.best_val_loss, res.final_val_loss) == (4, True, 2.0, 2.6)
    assert [h["eval_loss"] for h in st.log_history if "eval_loss" in h] == [3.0, 2.0, 2.5, 2.6]
    assert (st.best_val, st.evals_without_gain) == (2.0, 2)
    ckpt = checkpoints.find_resumable(tmp_path, "f")
    assert ckpt.name == "checkpoint-4"
    assert json.loads((ckpt / checkpoints.MARKER).read_text())["val_loss"] == 2.6


def test_the_final_step_is_evaluated_and_saved_once(workspace, tmp_path, monkeypatch):
    """max_steps off the eval and save grid: a final evaluation and checkpoint at the last step;
    on the eval grid but not the save grid: saved, not evaluated a second time. (A checkpoint
    without a val loss, here step 5 and 4, is not among the best k once a newer one exists.)"""
    calls = []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda *a: calls.append(1) or real(*a))
    for steps, save, evals in ((7, 5, [3, 6, 7]), (6, 4, [3, 6])):
        calls.clear()
        d = tmp_path / str(steps)
        out = train_tiny(workspace, d, max_steps=steps, eval_every=3, save_every=save,
                         keep_checkpoints=5, fingerprint="f")
        assert [h["step"] for h in out.state.log_history if "eval_loss" in h] == evals
        assert len(calls) == len(evals)
        assert sorted(p.name for p in d.iterdir()) == [f"checkpoint-{steps}"]
        marker = json.loads((d / f"checkpoint-{steps}" / checkpoints.MARKER).read_text())
        assert marker["val_loss"] == out.result.final_val_loss


def test_dvclive_gets_the_curves(workspace, tmp_path):
    from dvclive import Live

    live = Live(str(tmp_path / "live"), dvcyaml=False, save_dvc_exp=False)
    try:
        out = train_tiny(workspace, tmp_path / "ck", max_steps=6, log_every=2, eval_every=3, live=live)
    finally:
        live.end()
    plots = tmp_path / "live" / "plots" / "metrics"

    def col(name, key):
        rows = [ln.split("\t") for ln in (plots / name).read_text().splitlines()]
        i, j = rows[0].index("step"), rows[0].index(key)
        return [(int(r[i]), float(r[j])) for r in rows[1:]]
    hist = out.state.log_history
    assert col("loss.tsv", "loss") == [(h["step"], pytest.approx(h["loss"])) for h in hist if "loss" in h]
    assert [s for s, _ in col("loss.tsv", "loss")] == [1, 2, 4, 6]
    assert col("eval/loss.tsv", "loss") == [(h["step"], pytest.approx(h["eval_loss"]))
                                            for h in hist if "eval_loss" in h]
    assert [s for s, _ in col("eval/loss.tsv", "loss")] == [3, 6]
    for name in ("learning_rate.tsv", "grad_norm.tsv", "epoch.tsv", "tokens_per_s.tsv"):
        assert (plots / name).exists(), name
    assert json.loads((tmp_path / "live" / "metrics.json").read_text())["step"] == 6


def test_report_to_a_tracker_whose_package_is_missing_is_one_line_user_error(monkeypatch):
    """Checked before any output (pipeline.run): a missing package is a UserError naming it.
    Missing is made here (sys.modules[name] = None fails its import), installed or not."""
    from pydantic import ValidationError

    from codex_ml.stage import UserError
    from codex_ml.training import trackers

    trackers.check([])
    for name in ("tensorboard", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)
        with pytest.raises(UserError, match=f"train.report_to: {name} needs the {name} package") as e:
            trackers.check([name])
        assert "\n" not in str(e.value) and f"pip install {name}" in str(e.value)
    # torch's SummaryWriter is the tensorboard package's: torch.utils.tensorboard alone won't do
    # (without the package its import fails: "No module named 'tensorboard'").
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ImportError):
        import torch.utils.tensorboard  # noqa: F401
    with pytest.raises(ValidationError):
        params(train=dict(report_to=["wandb"]))


@pytest.mark.parametrize("tracker", ["tensorboard", "mlflow"])
def test_report_to_writes_the_curves_beside_dvclives(workspace, tmp_path, tracker):
    pytest.importorskip(tracker)
    from dvclive import Live

    live = Live(str(tmp_path / "live"), dvcyaml=False, save_dvc_exp=False)
    try:
        train_tiny(workspace, tmp_path / "ck", max_steps=4, log_every=2, eval_every=4,
                   report_to=[tracker], live=live)
    finally:
        live.end()
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ev = EventAccumulator(str(tmp_path / "live" / "tensorboard"))
        ev.Reload()
        assert [e.step for e in ev.Scalars("train/loss")] == [1, 2, 4]
        assert [e.step for e in ev.Scalars("eval/loss")] == [4]
    else:
        import mlflow

        mlflow.set_tracking_uri((tmp_path / "live" / "mlruns").resolve().as_uri())  # allowed by trackers
        (run,) = mlflow.search_runs(experiment_names=["codex-pipeline"], output_format="list")
        client = mlflow.tracking.MlflowClient()
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 4]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [4]


def test_bf16_training_autocasts_the_matmuls_and_keeps_fp32_weights(workspace, tmp_path):
    from codex_ml import modeling

    p = params(train=dict(max_steps=3, precision="bf16", save_every=1000, eval_every=1000))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, o: seen.append((m.training, o.dtype)))
    out = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)
    assert out.result.precision == "bf16" and out.result.steps == 3
    assert set(seen) == {(True, torch.bfloat16), (False, torch.bfloat16)}  # training and eval
    assert {p.dtype for p in out.model.parameters()} == {torch.float32}
    assert out.result.final_val_loss is not None


def test_engine_trains_with_causal_attention_and_rope_table_and_restores_the_model(workspace, tmp_path):
    """On a CPU too (auto): the model trains with transforms.CAUSAL_SDPA and the RoPE table, and
    comes back as it was: its attention setting, its rotary module, its saved config."""
    from codex_ml import modeling

    p = params(train=dict(max_steps=2, save_every=1000, eval_every=1000))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    rotary = model.model.rotary_emb
    seen = set()
    model.register_forward_pre_hook(lambda m, a: seen.add(
        (m.config._attn_implementation, type(m.model.rotary_emb).__name__)))
    engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)
    assert seen == {(transforms.CAUSAL_SDPA, "RopeTable")}
    assert model.config._attn_implementation == "sdpa" and model.model.rotary_emb is rotary
    model.save_pretrained(tmp_path / "saved")
    assert transforms.CAUSAL_SDPA not in (tmp_path / "saved" / "config.json").read_text()


def test_the_loop_keeps_the_bf16_weight_copies_equal_to_the_weights(workspace, tmp_path):
    """bf16_weights on (CPU, bf16): the loop refreshes the copies after each optimizer step (torch's
    AdamW here; AdamW16 writes them itself on a GPU), so the run trains the weights of the same run
    without copies, bit for bit (on a CPU the two round alike), and nothing is left on the model."""
    runs = {}
    for on in ("on", "off"):
        out = train_tiny(workspace, tmp_path / on, max_steps=6, precision="bf16",
                         engine=dict(bf16_weights=on, fused_proj="all", bf16_residual="off"))
        assert not swapped(out.model)
        runs[on] = out.model
    same_weights(runs["on"], runs["off"])


@pytest.mark.parametrize("on", ["on", "off"])
def test_bf16_training_keeps_the_residual_stream_in_bf16(workspace, tmp_path, on):
    """Under bf16 autocast the blocks add bf16 to bf16 (the stream no longer inherits the fp32
    embedding's dtype), only while training: the model's own forward is fp32 again afterwards."""
    from codex_ml import modeling

    p = params(train=dict(max_steps=2, precision="bf16", save_every=1000, eval_every=1000,
                          engine=dict(bf16_residual=on)))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    seen = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
    engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)
    assert seen and set(seen) == {torch.bfloat16 if on == "on" else torch.float32}
    seen.clear()
    model(input_ids=tr[:1])
    hook.remove()
    assert seen == [torch.float32]


def test_clipping_folded_into_the_fused_optimizers_grad_scale_trains_the_same_weights(
        workspace, tmp_path, monkeypatch):
    """fused_clip: the clip factor max(1, norm / max_grad_norm) handed to fused AdamW as its
    grad_scale gives the weights and the logged pre-clip norms of clipping first and stepping
    after; the norm is large enough that clipping changes the weights, so the comparison can
    fail. torch's fused AdamW runs on a CPU (torch >= 2.4), so the engine is made to use it here
    (on a GPU it does by itself: tests/test_gpu.py)."""
    import dataclasses

    resolve = transforms.resolve
    made = []

    def fused_optimizer(model, t, plan, copies):
        params_ = [p for p in model.parameters() if p.requires_grad]
        made.append(torch.optim.AdamW(params_, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, fused=True))
        return made[-1]
    monkeypatch.setattr(engine, "_optimizer", fused_optimizer)
    runs = {}
    for fold, clip in ((True, 0.05), (False, 0.05), (False, 0.0)):
        monkeypatch.setattr(transforms, "resolve", lambda *a, **k: dataclasses.replace(
            resolve(*a, **k), fused_clip=fold))
        out = train_tiny(workspace, tmp_path / f"{fold}{clip}", max_steps=4, log_every=1,
                         max_grad_norm=clip, lr=1e-2)
        norms = [h["grad_norm"] for h in out.state.log_history if "grad_norm" in h]
        runs[fold, clip] = torch.cat([p.detach().flatten() for p in out.model.parameters()]), norms
        assert (getattr(made[-1], "grad_scale", None) is not None) == fold
    (folded, norms), (clipped, clip_norms), (unclipped, _) = runs.values()
    assert len(norms) == 4 and min(norms) > 0.05 and norms == pytest.approx(clip_norms, rel=1e-5)
    torch.testing.assert_close(folded, clipped, rtol=1e-5, atol=1e-6)
    assert (folded - unclipped).abs().max() > 1e-3


def test_a_resumed_run_drops_the_curve_rows_logged_after_its_checkpoint(tmp_path):
    """Killed at step 17 after a checkpoint at 10: the steps 15 (and 20 of eval) logged before the
    kill would be logged again by the resumed run."""
    from codex_ml.training import pipeline

    plots = tmp_path / "plots" / "metrics"
    (plots / "eval").mkdir(parents=True)
    (plots / "loss.tsv").write_text("timestamp\tstep\tloss\n" + "".join(
        f"{t}\t{s}\t1.0\n" for t, s in enumerate([1, 5, 10, 15])))
    (plots / "eval" / "loss.tsv").write_text("timestamp\tstep\tloss\n1\t10\t2.0\n2\t20\t1.5\n")
    pipeline.trim_curves(tmp_path, 10)
    assert [ln.split("\t")[1] for ln in (plots / "loss.tsv").read_text().splitlines()[1:]] == \
        ["1", "5", "10"]
    assert (plots / "eval" / "loss.tsv").read_text() == "timestamp\tstep\tloss\n1\t10\t2.0\n"
    pipeline.trim_curves(tmp_path / "missing", 10)  # a first run has no curves yet


def test_incomplete_and_foreign_checkpoints_are_never_resumed(tmp_path):
    def ckpt(step, marker):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if marker:
            io.write_json(d / checkpoints.MARKER, marker)
    ckpt(10, {"fingerprint": "aaa", "step": 10, "val_loss": 3.0})
    ckpt(20, {"fingerprint": "bbb", "step": 20, "val_loss": 2.0})
    ckpt(30, None)  # killed while saving
    assert checkpoints.find_resumable(tmp_path, "aaa") == tmp_path / "checkpoint-10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]
    assert checkpoints.find_resumable(tmp_path, "ccc") is None
    assert list(tmp_path.iterdir()) == []




def test_rotate_keeps_best_k_by_val_loss_plus_latest(tmp_path):
    for step, val in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.8), (50, 2.9)]:
        checkpoints.mark_complete(mkdir(tmp_path / f"checkpoint-{step}"), "f", step, val)
    (tmp_path / "checkpoint-60").mkdir()  # incomplete: not counted, not removed by rotate
    checkpoints.rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30",
                                                          "checkpoint-50", "checkpoint-60"]


def mkdir(d: Path) -> Path:
    d.mkdir(parents=True)
    return d


# ---------------------------------------------------------------- the stage, end to end
def stage_dir(workspace: Path, tmp: Path, **over) -> Path:
    d = tmp
    (d / "data").mkdir(parents=True, exist_ok=True)
    (d / "models").mkdir(exist_ok=True)
    (d / "data" / "tokens").symlink_to(workspace / "data" / "tokens")
    (d / "models" / "tokenizer").symlink_to(workspace / "models" / "tokenizer")
    raw = {"seed": 7, "model": dict(TINY_MODEL), "train": dict(TINY_TRAIN, max_steps=40)}
    for group, vals in over.items():
        raw[group].update(vals)
    (d / "params.yaml").write_text(yaml.safe_dump(raw))
    return d


def stage(cwd: Path, ranks: int = 0, **kw) -> subprocess.Popen:
    """The train stage as a subprocess; ranks > 0 launches it under torchrun with that many
    processes (on a CPU: gloo), as the stage itself does when it sees several GPUs."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={ranks}"] if ranks else [sys.executable]
    return subprocess.Popen([*launch, str(ROOT / "stages" / "train_model.py")], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def kill_job(proc: subprocess.Popen) -> None:
    """kill -9 of a whole job: the launcher and every process under it (torchrun starts its
    workers in their own sessions, so killing its process group alone leaves them running)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def ddp_kill_and_resume(workspace, tmp_path, train: dict, ranks: int = 0) -> None:
    """Two ranks train; the whole job is killed after the first checkpoint; a rerun resumes from a
    checkpoint mid-run on both ranks and ends where an uninterrupted run ends."""
    ref = stage(stage_dir(workspace, tmp_path / "ref", train=train), ranks)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]

    cut = stage_dir(workspace, tmp_path / "cut", train=train)
    victim = stage(cut, ranks)
    marker = cut / "models" / "checkpoints" / f"checkpoint-{train['save_every']}" / checkpoints.MARKER
    deadline = time.time() + 600
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), victim.stdout.read()[-3000:] if victim.poll() is not None else ""
    kill_job(victim)
    assert not (cut / "models" / "model").exists()

    resumed = stage(cut, ranks)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    m = json.loads((cut / "metrics" / "train.json").read_text())
    n = train["max_steps"]
    assert m["world_size"] == 2 and m["steps"] == n, m
    assert train["save_every"] <= m["resumed_from_step"] < n, m  # resumed mid-run
    # Written once, by rank 0: one model, checkpoints = best 2 + the latest.
    assert len(list((cut / "models" / "checkpoints").glob("checkpoint-*"))) <= 3
    # Same data order after the resume; reductions across ranks are not bit-exact in general,
    # so compare where both runs end up.
    r = json.loads((tmp_path / "ref" / "metrics" / "train.json").read_text())
    assert abs(r["final_val_loss"] - m["final_val_loss"]) < 0.05, (r, m)


@pytest.mark.slow
def test_two_ranks_resume_after_kill_9_of_the_whole_job(workspace, tmp_path):
    ddp_kill_and_resume(workspace, tmp_path, ranks=2,
                        train=dict(max_steps=80, save_every=10, eval_every=10))


@pytest.mark.slow
def test_two_ranks_all_reduce_gradients_in_bf16_when_asked(workspace, tmp_path):
    """train.ddp_allreduce: bf16 (gloo here, NCCL on GPUs): DDP sends bf16 gradients, so the run
    ends near, but not exactly at, the fp32 all-reduce's run on the same data."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        d = stage_dir(workspace, tmp_path / dtype, train=dict(max_steps=10, eval_every=10,
                                                               save_every=10, ddp_allreduce=dtype))
        proc = stage(d, ranks=2)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        assert ("all-reduces gradients in bf16" in out) == (dtype == "bf16"), out[-3000:]
        runs[dtype] = json.loads((d / "metrics" / "train.json").read_text())
    a, b = runs["fp32"]["final_val_loss"], runs["bf16"]["final_val_loss"]
    assert runs["bf16"]["world_size"] == 2 and a != b and abs(a - b) < 0.05, (a, b)


def trained_weights(workspace, tmp_path, name: str, ranks: int, **train) -> dict:
    d = stage_dir(workspace, tmp_path / name, train=dict(
        dict(max_steps=8, eval_every=8, save_every=8, max_grad_norm=0.0), **train))
    proc = stage(d, ranks)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    m = json.loads((d / "metrics" / "train.json").read_text())
    assert m["world_size"] == max(ranks, 1) and m["steps"] == 8, m
    return weights(d / "models" / "model")


def assert_weights_close(a: dict, b: dict, atol: float = 2e-4) -> None:
    assert a.keys() == b.keys()
    for k, w in a.items():
        torch.testing.assert_close(b[k], w, rtol=0, atol=atol, msg=k)


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_at_the_same_global_batch(workspace, tmp_path):
    """DDP's gradients are views into its all-reduce buckets: 2 ranks x 2 blocks end with the
    weights of 1 rank x 4 blocks, and of 1 rank x 2 blocks x 2 accumulated micro-batches, on the
    same data (engine.Order gives rank r of global batch k what micro-batch k x ranks + r is in one
    rank's order), which a stale, unreduced or doubly-counted gradient, or a wrong division by the
    step's token count, would break. No clipping: it would hide a gradient's scale. Within the
    first epoch (8 x 4 of 1278 blocks): an epoch's leftover blocks differ between the layouts."""
    ddp = trained_weights(workspace, tmp_path, "ddp", 2, batch_size=2)
    assert_weights_close(trained_weights(workspace, tmp_path, "batch", 0, batch_size=4), ddp)
    assert_weights_close(trained_weights(workspace, tmp_path, "accum", 0, batch_size=2, grad_accum=2), ddp)


@pytest.mark.slow
def test_fsdp_on_two_cpu_ranks_trains_like_one_rank_and_saves_a_loadable_model(workspace, tmp_path):
    """train.distributed: fsdp on gloo (FSDP2, fully_shard over the decoder layers and the model):
    the weights of 1 rank x the global batch, gathered whole on rank 0 and saved as a standard
    transformers model (not DTensor shards) that AutoModelForCausalLM loads."""
    from transformers import AutoModelForCausalLM

    fsdp = trained_weights(workspace, tmp_path, "fsdp", 2, batch_size=2, distributed="fsdp")
    assert_weights_close(trained_weights(workspace, tmp_path, "one", 0, batch_size=4), fsdp)
    d = tmp_path / "fsdp"
    model = AutoModelForCausalLM.from_pretrained(d / "models" / "model")
    m = json.loads((d / "metrics" / "train.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == m["params"]
    assert m["loss"] == "model" and m["final_val_loss"] is not None


@pytest.mark.slow
def test_a_fresh_run_without_dvclive_leaves_no_previous_runs_curves(workspace, tmp_path, monkeypatch):
    """Where dvclive cannot be imported the stage warns and trains on; the previous run's curves
    must not stay in metrics/train, where the report would show them as this run's (seen on a
    GPU image without dvclive's dependencies)."""
    d = stage_dir(workspace, tmp_path / "run", train=dict(max_steps=4, eval_every=4, save_every=4))
    stale = d / "metrics" / "train" / "plots" / "metrics" / "loss.tsv"
    stale.parent.mkdir(parents=True)
    stale.write_text("timestamp\tstep\tloss\n0\t1100\t4.2\n")
    hidden = tmp_path / "no_dvclive" / "dvclive"  # shadows the installed package
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('no dvclive in this environment')\n")
    monkeypatch.setenv("PYTHONPATH", str(hidden.parent))
    proc = stage(d)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "dvclive unavailable" in out, out[-3000:]
    assert not stale.exists()
    assert json.loads((d / "metrics" / "train.json").read_text())["steps"] == 4


def test_check_data_names_what_is_too_small():
    from codex_ml.stage import UserError

    t = params().train
    blocks = torch.zeros((t.batch_size, t.block_size), dtype=torch.long)
    assert engine.check_data(blocks, blocks[:1], t) == t.batch_size
    with pytest.raises(UserError, match="train split packs into 3 blocks"):
        engine.check_data(blocks[:3], blocks, t)
    with pytest.raises(UserError, match="val split packs into 0 blocks"):
        engine.check_data(blocks, blocks[:0], t)


@pytest.mark.slow
def test_two_ranks_evaluate_with_fewer_eval_batches_than_ranks(workspace, tmp_path):
    """Each rank must get whole eval batches (the eval loader drops partial ones): with
    eval_batches = 1 on two ranks, one batch split in halves gave no eval loss at all, and the
    Trainer failed at its first evaluation (KeyError 'eval_loss')."""
    d = stage_dir(workspace, tmp_path, train=dict(max_steps=4, save_every=1000, eval_every=2,
                                                  eval_batches=1))
    proc = stage(d, 2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    m = json.loads((d / "metrics" / "train.json").read_text())
    assert m["world_size"] == 2 and m["final_val_loss"] is not None, m


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(model_dir / "model.safetensors")


@pytest.mark.slow
def test_stage_resumes_after_kill_9_with_the_same_final_weights(workspace, tmp_path, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = stage_dir(workspace, tmp_path / "full")
    cut = stage_dir(workspace, tmp_path / "cut")
    ref = stage(full)
    victim = stage(cut)
    marker = cut / "models" / "checkpoints" / "checkpoint-10" / checkpoints.MARKER
    deadline = time.time() + 300
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stdout.read()[-3000:]
    assert not (cut / "models" / "model").exists()  # killed before the end

    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]
    resumed = stage(cut)
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log[-3000:]
    assert "resuming from" in log

    mf, mc = (json.loads((d / "metrics" / "train.json").read_text()) for d in (full, cut))
    assert mf["steps"] == mc["steps"] == 40 and mc["resumed_from_step"] >= 10
    a, b = weights(full / "models" / "model"), weights(cut / "models" / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)

    # The output is a standard HF model dir with card, provenance and live metrics.
    out_dir = full / "models" / "model"
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tok = AutoTokenizer.from_pretrained(out_dir)
    assert model.config.vocab_size == len(tok)
    card = (out_dir / "README.md").read_text()
    assert "test-v1" in card and "best_val_loss" in card
    prov = json.loads((out_dir / "provenance.json").read_text())
    assert {"git", "requirements_lock_sha256", "torch", "transformers", "devices", "seed"} <= prov.keys()
    plots = full / "metrics" / "train" / "plots" / "metrics"
    # Curves: train loss every log_every (5) steps from step 1, val loss every eval_every (10).
    assert len((plots / "loss.tsv").read_text().splitlines()) == 1 + 1 + 40 // 5
    assert len((plots / "eval" / "loss.tsv").read_text().splitlines()) == 1 + 40 // 10
    assert not (plots / "train").exists()  # the end-of-run summary is no curve
    # The resumed run's curve has each logged step once, like the uninterrupted run's.
    steps = [[ln.split("\t")[1] for ln in (d / "metrics/train/plots/metrics/loss.tsv").read_text()
              .splitlines()[1:]] for d in (full, cut)]
    assert steps[0] == steps[1], steps
    # Checkpoints: best-k (2) by val loss plus the latest.
    assert len(list((full / "models" / "checkpoints").glob("checkpoint-*"))) <= 3

    # Other params: the checkpoints are not resumed, and the log says so.
    from codex_ml.training import pipeline

    os.chdir(cut)
    try:
        with caplog.at_level(logging.INFO):
            m = pipeline.run(params(train=dict(lr=1e-3, max_steps=5)), pipeline.Paths())
    finally:
        os.chdir(ROOT)
    assert "made with other params or data" in caplog.text and "resuming from" not in caplog.text
    assert m["resumed_from_step"] == 0 and m["steps"] == 5


@pytest.mark.slow
def test_stage_rerun_after_the_last_checkpoint_loads_it_and_keeps_the_curves(workspace, tmp_path):
    """A rerun that finds the final checkpoint (e.g. `dvc repro -f`, or a code change) finishes
    without training, with the same weights and the earlier live curves; it must also exit
    (dvclive's monitor thread once kept such a run alive forever)."""
    d = stage_dir(workspace, tmp_path)
    first = stage(d)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    w1 = weights(d / "models" / "model")
    curve = (d / "metrics" / "train" / "plots" / "metrics" / "loss.tsv").read_text()
    again = stage(d)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out[-3000:]
    assert "resuming from" in out and "at step 40" in out
    m = json.loads((d / "metrics" / "train.json").read_text())
    assert m["steps"] == m["resumed_from_step"] == 40
    for k, v in weights(d / "models" / "model").items():
        assert torch.equal(v, w1[k]), k
    assert (d / "metrics" / "train" / "plots" / "metrics" / "loss.tsv").read_text() == curve


@pytest.mark.slow
def test_pipeline_lora_on_a_pretrained_model_the_pipeline_made(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from codex_ml import modeling
    from codex_ml.training import pipeline

    torch.manual_seed(0)
    tok = modeling.load_tokenizer(workspace / "models" / "tokenizer")
    base = tmp_path / "base"
    modeling.build(params().model, tok, 32).save_pretrained(base)
    tok.save_pretrained(base)
    p = params(model=dict(init="pretrained", base=str(base),
                          lora=dict(enabled=True, r=4, target_modules=["q_proj", "v_proj"],
                                    merge=True)),
               train=dict(max_steps=6, eval_every=3, save_every=3))
    paths = pipeline.Paths(tokens=make_tokens(workspace, base, tmp_path / "tokens"), tokenizer=base,
                           out=tmp_path / "model", checkpoints=tmp_path / "ck",
                           live=tmp_path / "live", lock=ROOT / "requirements.lock")
    m = pipeline.run(p, paths)
    assert m["steps"] == 6 and m["trainable_params"] < m["params"] / 5
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                        tmp_path / "model" / "adapter").eval()
    x = torch.randint(4, len(tok), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted(input_ids=x).logits,
                                   rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def one_rank_group(monkeypatch):
    """A one-rank gloo process group on a free local port, for torch.distributed's own objects
    (DDP, DTensor) in this process; destroyed afterwards."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()





# ---------------------------------------------------------------- the speed levers (transforms.py)
def plan(**levers) -> transforms.Plan:
    return transforms.Plan(**{"device": "cpu", "precision": "fp32", **levers})


@contextlib.contextmanager
def optimized(model, length: int = 16, **levers):
    done = transforms.optimize(model, plan(**levers), length)
    try:
        yield done
    finally:
        done.undo()


SWAPPED = (transforms.FusedAttention, transforms.FusedMLP, transforms.Linear16Module, transforms.RopeTable)


def swapped(model) -> list:
    return [type(m).__name__ for m in model.modules() if isinstance(m, SWAPPED)]


def sdpa_calls_when_compiled(model, x) -> tuple[list, torch.Tensor]:
    """(attn_mask given?, is_causal) of each SDPA call in the graph torch.compile captures, and the
    backend names of each sdpa_kernel setting in it."""
    seen = []

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.target is torch.nn.attention._sdpa_kernel:
                seen.append(tuple(a.args[0] for a in n.args[0]))
            elif "scaled_dot_product_attention" in str(n.target):
                mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
                seen.append((mask is not None, n.kwargs.get("is_causal", False)))
        return gm.forward

    torch._dynamo.reset()
    logits = torch.compile(model, backend=backend)(input_ids=x).logits
    torch._dynamo.reset()
    return seen, logits


def test_compiled_model_attends_with_is_causal_not_an_explicit_mask():
    """Under torch.compile (torch < 2.14) transformers hands SDPA a T x T mask, which rules out the
    flash kernels (on an H200 the mask kernel took 23% of a step). With causal_attention the
    compiled graph calls SDPA with is_causal and no mask, with the same logits; undo restores the
    model's setting. A chosen kernel order is part of the graph (compile caches key on the graph,
    not on the global flags). A sliding-window model needs its mask: auto leaves it, on refuses."""
    from transformers import MistralConfig, MistralForCausalLM

    from codex_ml.params import Train
    from codex_ml.stage import UserError

    torch.manual_seed(0)
    model = tiny_llama().eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = model(input_ids=x).logits
        plain, _ = sdpa_calls_when_compiled(model, x)
        with optimized(model, causal_attention=True):
            assert model.config._attn_implementation == transforms.CAUSAL_SDPA
            calls, logits = sdpa_calls_when_compiled(model, x)
    assert plain and all(mask for mask, _ in plain)  # transformers' own path: a mask
    assert calls == [(False, True)] * 2
    assert torch.allclose(logits, want, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored: the saved config is unchanged
    from torch.nn.attention import SDPBackend as B
    with torch.no_grad(), optimized(model, causal_attention=True, attention=[B.MATH, B.FLASH_ATTENTION]):
        calls, _ = sdpa_calls_when_compiled(model, x)
    assert calls[:2] == [("MATH", "FLASH_ATTENTION"), (False, True)] and len(calls) == 6
    local = MistralForCausalLM(MistralConfig(**TINY_LLAMA, sliding_window=8))
    assert not transforms.resolve(Train(), local).causal_attention
    assert transforms.resolve(Train(), model).causal_attention  # auto: on where it applies, CPU too
    with pytest.raises(UserError, match="causal_attention = on: the model has sliding-window"):
        transforms.resolve(Train(engine=dict(causal_attention="on")), local)


def test_causal_attention_reads_nothing_back_to_the_host_in_eager_mode():
    """Eager, transformers checked the position ids for packed sequences with `.all()` in every
    forward: a value read back to the host, on a GPU a sync per step (found by the GPU test
    test_engine_steps_never_wait_for_the_gpu). causal_attention's model builds no mask at all."""
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 16))

    def host_reads():
        with torch.profiler.profile() as prof:
            model(input_ids=x, labels=x).loss.backward()
        return {e.key for e in prof.key_averages()} & {"aten::item", "aten::_local_scalar_dense"}

    assert host_reads()  # transformers' own path: this test would see a regression
    with optimized(model, causal_attention=True):
        assert not host_reads()


def test_rope_table_gives_the_same_logits_without_computing_cos_sin_in_the_graph():
    """Compiled, the rotary cos/sin got recomputed inside every layer's q/k kernels (2.5 ms of a
    37 ms step on an H200); with rope_table the model reads a table made once, covering the
    training length where it exceeds max_position_embeddings."""
    torch.manual_seed(0)
    model = tiny_llama(max_position_embeddings=64).eval()
    x = torch.randint(0, 64, (2, 80))  # longer than max_position_embeddings: still covered
    keys, rotary = list(model.state_dict()), model.model.rotary_emb

    def trig_ops():
        seen = []

        def backend(gm, example_inputs):
            seen.extend(n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                        and getattr(n.target, "__name__", n.target) in ("cos", "sin"))
            return gm.forward
        torch._dynamo.reset()
        torch.compile(model, backend=backend)(input_ids=x)
        torch._dynamo.reset()
        return seen

    with torch.no_grad():
        want, plain = model(input_ids=x).logits, trig_ops()
        with optimized(model, length=80, rope_table=True):
            assert isinstance(model.model.rotary_emb, transforms.RopeTable)
            assert model.model.rotary_emb.cos.shape[0] == 80
            assert torch.equal(model(input_ids=x).logits, want)
            assert plain and not trig_ops()
            assert list(model.state_dict()) == keys  # the table is no state
    assert list(model.state_dict()) == keys and model.model.rotary_emb is rotary


def test_fused_projections_make_one_matmul_per_group_with_the_same_loss_and_gradients():
    """q/k/v (and with `all` gate/up) run as one matmul each (no graph break); logits and every
    parameter's gradient match the separate layers' (fp32), eager and compiled; parameter names
    and state_dict keys are the same while fused and after undo; LoRA-wrapped projections keep
    their own matmuls; nothing is left on the model afterwards."""
    from codex_ml.modeling import apply_lora
    from codex_ml.params import Lora

    torch.manual_seed(0)
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 16))
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())

    def step(m):
        m.zero_grad()
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        return out.logits.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                                     for n, p in m.named_parameters() if p.grad is not None}

    def linears(m):
        graphs = []
        torch._dynamo.reset()
        torch.compile(m, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(
            input_ids=x)
        torch._dynamo.reset()
        return sum(n.target is torch._C._nn.linear for g in graphs for n in g.graph.nodes)

    want_logits, want_grads = step(model)
    layers = model.config.num_hidden_layers
    assert linears(model) == 7 * layers + 1
    for which, n in (("qkv", 5), ("all", 4)):
        with optimized(model, fused_proj=which) as done:
            assert len(done.swaps) == layers * (1 if which == "qkv" else 2) and not done.copies
            assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
            assert linears(model) == n * layers + 1
            logits, grads = step(model)
            torch._dynamo.reset()
            c_logits, c_grads = step(torch.compile(model, backend="aot_eager", fullgraph=True))
            torch._dynamo.reset()
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(c_logits, want_logits, rtol=0, atol=1e-6)
        for g in (grads, c_grads):
            assert g.keys() == want_grads.keys()
            for k in g:
                torch.testing.assert_close(g[k], want_grads[k], rtol=1e-5, atol=1e-7, msg=k)
        assert not swapped(model)
        assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys

    lora = apply_lora(model, Lora(enabled=True, target_modules=["q_proj", "v_proj"]))
    unfused = linears(lora)
    with optimized(lora, fused_proj="all"):
        assert linears(lora) == unfused - layers  # only gate/up fused: q, k, v keep their own
        assert set(swapped(lora)) == {"FusedMLP"}
    with optimized(model):
        assert not swapped(model)


def test_every_lever_undone_leaves_save_pretrained_byte_identical(tmp_path):
    """All the model transforms at once (bf16 plan), a training step in between: after undo,
    save_pretrained writes the bytes a model never optimized (with the same weights) writes."""
    import filecmp

    torch.manual_seed(0)
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 16))
    twin = tiny_llama()
    with optimized(model, precision="bf16", causal_attention=True, rope_table=True,
                   fused_proj="all", bf16_weights=True, bf16_residual=True) as done:
        assert done.copies and done.hooks and done.attn_before == "sdpa"
        assert {"FusedAttention", "FusedMLP", "Linear16Module", "RopeTable"} <= set(swapped(model))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x, labels=x).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
    assert not swapped(model) and not model.model.embed_tokens._forward_hooks
    twin.load_state_dict(model.state_dict())
    model.save_pretrained(tmp_path / "a")
    twin.save_pretrained(tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors" in files and files == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all(filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False) for f in files)


def test_bf16_weight_copies_train_like_autocast_and_follow_the_weights():
    """bf16_weights: every trainable bias-free Linear but the head runs on a bf16 copy of its
    weights (one per fused group); trained under bf16 autocast with the copies refreshed after each
    AdamW step (adamw.AdamW16 on a CPU: torch's step, then the refresh), the weights end where
    autocast's own casts take them, the copies equal the weights in bf16, the traced graph leaves
    only the head to autocast, and nothing is left on the model afterwards. Under LoRA only the
    adapters get copies: the frozen base layers keep autocast."""
    from codex_ml.modeling import apply_lora
    from codex_ml.params import Lora

    x = torch.randint(0, 64, (4, 16))

    def train(with_copies: bool, steps: int = 5):
        torch.manual_seed(0)
        model = tiny_llama()
        with optimized(model, precision="bf16", fused_proj="all", bf16_weights=with_copies) as done:
            copies = done.copies
            assert bool(copies) == with_copies
            opt = (adamw.AdamW16(model.parameters(), lr=1e-2, copies=copies) if with_copies
                   else torch.optim.AdamW(model.parameters(), lr=1e-2))
            for _ in range(steps):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
                if with_copies:
                    linear = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
                    assert linear and all(p.grad.dtype == torch.float32 for p in linear)
                opt.step()
                opt.zero_grad()
            if with_copies:
                layer = model.model.layers[0]
                attn, mlp = layer.self_attn, layer.mlp
                want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                assert torch.equal(attn.qkv16, want.to(torch.bfloat16))
                assert torch.equal(mlp.gate_up16, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                                   .to(torch.bfloat16))
                assert isinstance(mlp.down_proj, transforms.Linear16Module)
                assert torch.equal(mlp.down_proj.w16, mlp.down_proj.weight.to(torch.bfloat16))
                assert all(torch.equal(c, p.detach().to(torch.bfloat16)) for p, c in copies.items())
                assert type(model.lm_head) is torch.nn.Linear
                graphs = []
                torch._dynamo.reset()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    torch.compile(model, fullgraph=True, backend=lambda gm, ex: graphs.append(gm)
                                  or gm.forward)(input_ids=x)
                torch._dynamo.reset()
                linears = [n for g in graphs for n in g.graph.nodes if n.target is torch._C._nn.linear]
                assert len(linears) == 1, linears  # only the head is left to autocast
        assert not swapped(model)
        assert not any(b in m._buffers for m in model.modules() for b in ("w16", "qkv16", "gate_up16"))
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    # On a CPU the weight gradient is rounded to bf16 after its matmul, as under autocast (fp32
    # out of the matmul is a CUDA kernel), so the two train to the same weights bit for bit.
    want, got = train(False), train(True)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)

    lora = apply_lora(tiny_llama(), Lora(enabled=True, target_modules=["q_proj", "v_proj"]))
    with optimized(lora, precision="bf16", fused_proj="all", bf16_weights=True) as done:
        trainable = {p for p in lora.parameters() if p.requires_grad}
        assert done.copies and set(done.copies) <= trainable
        copied = {n.split(".")[-2] for n, m in lora.named_modules()
                  if isinstance(m, transforms.Linear16Module)}
        assert copied == {"lora_A", "lora_B"}


def test_the_levers_auto_choice_on_a_cpu_and_on_where_they_cannot_apply():
    from codex_ml.modeling import apply_lora
    from codex_ml.params import Lora, Train
    from codex_ml.stage import UserError

    model = tiny_llama()
    p = transforms.resolve(Train(), model)
    assert (p.device, p.precision, p.compile, p.loss, p.fused_proj) == ("cpu", "fp32", False, "model", "")
    assert p.causal_attention and p.rope_table
    assert not (p.bf16_residual or p.bf16_weights or p.fused_adamw or p.fused_clip or p.deferred_logs)
    assert transforms.resolve(Train(precision="bf16"), model).bf16_residual
    assert transforms.resolve(Train(engine=dict(fused_proj="all")), model).fused_proj == "all"
    sharded = transforms.resolve(Train(engine=dict(fused_proj="auto")), model, sharded=True)
    assert sharded.fused_proj == "" and not sharded.bf16_weights
    for lever, why in (("fused_adamw", "no CUDA GPU"), ("fused_clip", "no CUDA GPU"),
                       ("bf16_weights", "train.precision is fp32"), ("deferred_logs", "CPU")):
        with pytest.raises(UserError, match=f"train.engine.{lever} = on: .*{why}.*; use auto or off"):
            transforms.resolve(Train(engine={lever: "on"}), model)
    with pytest.raises(UserError, match="fused_proj = qkv: FSDP"):
        transforms.resolve(Train(engine=dict(fused_proj="qkv")), model, sharded=True)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UserError, match="fused_proj = all: the model has no LlamaAttention"):
        transforms.resolve(Train(engine=dict(fused_proj="all")), gpt2)
    with pytest.raises(UserError, match="rope_table = on: the model has no plain"):
        transforms.resolve(Train(engine=dict(rope_table="on")), gpt2)
    lora = apply_lora(tiny_llama(), Lora(enabled=True, target_modules=["q_proj"]))
    assert transforms.resolve(Train(engine=dict(fused_proj="qkv")), lora).fused_proj == "qkv"
    assert transforms.process_env(Train(), sharded=False) == {}  # no CUDA: nothing to set


def test_fused_projections_compile_under_ddp_graph_splitting(monkeypatch):
    """DDP's graph splitting (dynamo's DDPOptimizer) copies the traced graph's input sources; with
    the layers' state reached through function defaults it failed on torch 2.11 (the GPU image's:
    "DefaultsSource.__init__() takes from 3 to 4 positional arguments"). A one-rank DDP model
    with small buckets (several graphs) compiles and gives the unwrapped model's loss."""
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    x = torch.randint(0, 64, (2, 16))
    with one_rank_group(monkeypatch), optimized(model, precision="bf16", fused_proj="all",
                                                bf16_weights=True), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=x, labels=x).loss
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
        torch._dynamo.reset()
        got = torch.compile(ddp, backend="aot_eager")(input_ids=x, labels=x).loss
        got.backward()
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    assert all(p.grad is not None for p in model.parameters())


def test_logs_read_fsdps_dtensor_gradient_norm(monkeypatch):
    """Under FSDP the gradient norm is a DTensor (partial on each rank until reduced); copying it
    to the host failed on two GPUs ("aten.copy_.default got mixed torch.Tensor and DTensor").
    Logs records its whole value."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    recs = []
    with one_rank_group(monkeypatch):
        mesh = init_device_mesh("cpu", (1,))
        logs = engine.Logs(False, 64, recs.append)
        logs.add(1, torch.tensor(2.0), 1, DTensor.from_local(torch.tensor(0.75), mesh, [Partial()]), 1e-3, 0.1)
    assert recs[0]["grad_norm"] == 0.75 and isinstance(recs[0]["grad_norm"], float)


def test_bf16_allreduce_hook_sends_bf16_and_reduces_into_the_fp32_bucket(monkeypatch):
    """engine.bf16_allreduce (torch's bf16 compress hook, under a name DDP takes on gloo too): a
    one-rank DDP step's gradients are the plain gradients rounded to bf16, still fp32 tensors."""
    torch.manual_seed(0)
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with one_rank_group(monkeypatch):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, engine.bf16_allreduce)
        ddp(input_ids=x, labels=x).loss.backward()
    rounded = False
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, want[n].bfloat16().float(), rtol=0, atol=0, msg=n)
        rounded |= not torch.equal(p.grad, want[n])
    assert rounded


def test_wide_cat_slices_lowers_only_wide_last_dim_concatenations_to_slices():
    """Under wide_cat_slices a last-dim cat of inputs >= 256 wide is lowered as slices that each
    producer writes (aliases of one output buffer), a narrow one keeps inductor's pointwise cat (a
    kernel named for the cat, with a masked load per input), results are the same, and inductor's
    lowering and config are back afterwards. On a CPU inductor always lowers cat to slices, unless
    force_pointwise_cat, which routes it through the helper the context swaps."""
    import torch._inductor.config as ic
    from torch._inductor import lowering
    from torch._inductor.utils import run_and_get_code

    from codex_ml.training.private import inductor_cat

    def f(a, b):
        return torch.cat([a.sin(), b.cos()], dim=-1) * 2

    def lowered(width):
        a, b = torch.randn(8, width), torch.randn(8, width)
        torch._dynamo.reset()
        out, (code,) = run_and_get_code(torch.compile(f, fullgraph=True), a, b)
        torch._dynamo.reset()
        torch.testing.assert_close(out, f(a, b))
        return {"pointwise": "fused_cat_" in code, "slices": code.count("# alias")}

    plain = lowering.pointwise_cat
    with ic.patch(force_pointwise_cat=True, fx_graph_cache=False):
        want = {w: lowered(w) for w in (32, 256)}
        with inductor_cat.wide_cat_slices(True):
            assert ic.post_grad_custom_post_pass.uuid()
            got = {w: lowered(w) for w in (32, 256)}
        assert lowering.pointwise_cat is plain and ic.post_grad_custom_post_pass is None
    pointwise = {"pointwise": True, "slices": 0}
    assert want == {32: pointwise, 256: pointwise}, want
    assert got == {32: pointwise, 256: {"pointwise": False, "slices": 2}}, got




def test_the_private_api_modules_fall_back_on_another_torch(monkeypatch):
    """private/: on a torch version they were not written for, the inductor lowering is reported
    unavailable (the context does nothing; fused_proj auto stays off) and torch's fused AdamW is
    not handed the clip factor (the loop clips in place); our own AdamW16 still takes it."""
    from codex_ml.params import Train
    from codex_ml.training import adamw, transforms
    from codex_ml.training.private import inductor_cat, optimizer_grad_scale

    w = torch.nn.Parameter(torch.ones(4))
    fused = torch.optim.AdamW([w], fused=True)
    assert inductor_cat.available() and optimizer_grad_scale.folds(fused)
    assert not optimizer_grad_scale.folds(torch.optim.AdamW([w]))  # not fused: no grad_scale
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert not inductor_cat.available() and not optimizer_grad_scale.folds(fused)
    assert optimizer_grad_scale.folds(adamw.AdamW16([w]))
    from torch._inductor import lowering
    plain = lowering.pointwise_cat
    with inductor_cat.wide_cat_slices(True) as on:
        assert on is False and lowering.pointwise_cat is plain
    assert transforms.resolve(Train(), tiny_llama()).fused_proj == ""
