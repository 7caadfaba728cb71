"""train_model: packing, the engine, checkpoints that resume after kill -9, the stage's outputs."""

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
from codex_ml.training import adamw, checkpoints, engine
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


def test_tiny_model_trains_loss_falls_and_is_deterministic(workspace, tmp_path):
    from codex_ml import modeling

    p = params(train=dict(max_steps=30, save_every=1000, eval_every=1000))
    tok, tr, va = tiny_blocks(workspace)
    weights = []
    for run in range(2):
        torch.manual_seed(p.seed)
        model = modeling.build(p.model, tok, 32)
        assert model.config.vocab_size == len(tok)
        trainer, res = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path / str(run))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert res.steps == 30 and res.tokens == 30 * 4 * 32
        assert losses[-1] < losses[0] - 0.5, losses
        assert res.final_val_loss < 5.5  # ln(400) = 6.0 for a uniform guess
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:  # same data, params and seed: same weights on CPU
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_resuming_a_checkpoint_at_max_steps_trains_nothing_and_keeps_its_weights(workspace, tmp_path):
    """A rerun that finds the final checkpoint (killed while writing the output, or rerun after a
    code change) must give that checkpoint's weights, not run a step past max_steps."""
    from codex_ml import modeling

    p = params(train=dict(max_steps=12, save_every=6, eval_every=6))
    tok, tr, va = tiny_blocks(workspace)
    torch.manual_seed(p.seed)
    first = modeling.build(p.model, tok, 32)
    _, r1 = engine.train(first, tr, va, p.train, seed=p.seed, out_dir=tmp_path, fingerprint="f")
    ckpt = checkpoints.find_resumable(tmp_path, "f")
    assert ckpt.name == "checkpoint-12"
    torch.manual_seed(p.seed + 1)
    again = modeling.build(p.model, tok, 32)
    _, r2 = engine.train(again, tr, va, p.train, seed=p.seed, out_dir=tmp_path, fingerprint="f",
                         resume_from=ckpt)
    assert (r2.steps, r2.start_step, r2.tokens_this_run) == (12, 12, 0)
    assert r2.final_val_loss == r1.final_val_loss and r2.final_train_loss == r1.final_train_loss
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_bf16_training_does_not_copy_the_logits_to_fp32(workspace, tmp_path):
    """accelerate casts every output of a mixed-precision forward to fp32: for an LM a full fp32
    copy of the logits per step (about 3% of an H200 step). The engine removes that cast."""
    from codex_ml import modeling

    p = params(train=dict(max_steps=3, precision="bf16", save_every=1000, eval_every=1000))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    trainer, res = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)
    assert res.precision == "bf16" and res.steps == 3
    out = trainer.model(input_ids=tr[:2], labels=tr[:2])
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


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
    flash kernels (on an H200 the mask kernel took 23% of a step). Inside causal_attention the
    compiled graph calls SDPA with is_causal and no mask, with the same logits."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = tiny_llama().eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = model(input_ids=x).logits
        with engine.causal_attention(model):
            calls, logits = sdpa_calls_when_compiled(model, x)
    assert calls == [(False, True)] * 2
    assert torch.allclose(logits, want, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored: the saved config is unchanged
    # A chosen kernel order is part of the graph (compile caches key on the graph, not on flags).
    from torch.nn.attention import SDPBackend as B
    with torch.no_grad(), engine.causal_attention(model, [B.MATH, B.FLASH_ATTENTION]):
        calls, _ = sdpa_calls_when_compiled(model, x)
    assert calls[:2] == [("MATH", "FLASH_ATTENTION"), (False, True)] and len(calls) == 6
    # A sliding-window model needs its mask: left alone.
    local = MistralForCausalLM(MistralConfig(**TINY_LLAMA, sliding_window=8))
    with engine.causal_attention(local):
        assert local.config._attn_implementation == "sdpa"


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
    with engine.causal_attention(model):
        assert not host_reads()


def test_rope_table_gives_the_same_logits_without_computing_cos_sin_in_the_graph():
    """Compiled, the rotary cos/sin got recomputed inside every layer's q/k kernels (2.5 ms of a
    37 ms step on an H200); inside rope_table the model reads a table made once."""
    torch.manual_seed(0)
    model = tiny_llama(max_position_embeddings=64).eval()
    x = torch.randint(0, 64, (2, 80))  # longer than max_position_embeddings: still covered
    keys = set(model.state_dict())

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
        with engine.rope_table(model, length=80):
            assert torch.equal(model(input_ids=x).logits, want)
            assert plain and not trig_ops()
    assert set(model.state_dict()) == keys and "forward" not in vars(model.model.rotary_emb)
    assert not hasattr(model.model.rotary_emb, "_rope_cos")


def test_engine_trains_with_causal_attention_and_restores_the_model_setting(workspace, tmp_path):
    from transformers import TrainerCallback

    from codex_ml import modeling

    p = params(train=dict(max_steps=2, save_every=1000, eval_every=1000))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    seen = set()

    class Look(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.add(model.config._attn_implementation)

    engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path, callbacks=[Look()])
    assert seen == {engine.CAUSAL_SDPA}
    assert model.config._attn_implementation == "sdpa"
    assert "sdpa_is_causal" not in (tmp_path / "checkpoint-2" / "config.json").read_text()


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


def test_keeper_keeps_best_k_by_val_loss_plus_latest(tmp_path):
    for step, val in [(10, 3.0), (20, 2.0), (30, 2.5), (40, 2.8), (50, 2.9)]:
        (tmp_path / f"checkpoint-{step}").mkdir()
        io.write_json(tmp_path / f"checkpoint-{step}" / checkpoints.MARKER,
                      {"fingerprint": "f", "step": step, "val_loss": val})
    checkpoints.Keeper("f", keep=2).rotate(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-20", "checkpoint-30",
                                                          "checkpoint-50"]


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


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_at_the_same_global_batch(workspace, tmp_path):
    """DDP's gradients are views into its all-reduce buckets (engine.DDP_BUCKET_VIEW): 2 ranks x 2
    blocks end with the weights of 1 rank x 4 blocks on the same data, which a stale, unreduced or
    doubly-counted gradient would break. No clipping: it would hide a gradient's scale."""
    from safetensors.torch import load_file

    weights = {}
    for ranks, batch in ((0, 4), (2, 2)):
        d = stage_dir(workspace, tmp_path / f"r{ranks}", train=dict(
            max_steps=8, batch_size=batch, eval_every=8, save_every=8, max_grad_norm=0.0))
        proc = stage(d, ranks)
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        weights[ranks] = load_file(d / "models" / "model" / "model.safetensors")
    assert weights[0].keys() == weights[2].keys()
    for k, w in weights[0].items():
        torch.testing.assert_close(weights[2][k], w, rtol=0, atol=2e-4, msg=k)


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
    assert "nothing left to train" in out
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


def test_clipping_folded_into_fused_adamw_trains_the_same_weights(tmp_path, monkeypatch):
    """With the clip factor handed to torch's fused AdamW as its grad_scale, the weights and the
    logged pre-clip norms are those of clipping first and stepping after (the Trainer's way); the
    norm is large enough that clipping changes the weights, so the comparison can fail."""
    from transformers import Trainer, TrainingArguments

    from codex_ml.params import Train

    blocks = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    t = Train(max_grad_norm=0.05)

    def run(fold: bool, clip: float):
        monkeypatch.setattr(engine, "FUSED_CLIP", fold)
        torch.manual_seed(0)
        model = tiny_llama()
        args = TrainingArguments(output_dir=str(tmp_path / f"{fold}{clip}"), optim="adamw_torch_fused",
                                 use_cpu=True, max_steps=4, learning_rate=1e-2, max_grad_norm=clip,
                                 logging_steps=1, report_to="none", save_strategy="no", seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=engine.Blocks(blocks))
        assert engine.clip_in_optimizer(trainer, t, "fp32") is fold
        trainer.train()
        norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        return torch.cat([p.detach().flatten() for p in model.parameters()]), norms

    folded, norms = run(True, 0.05)
    clipped, trainer_norms = run(False, 0.05)
    unclipped, _ = run(False, 0.0)
    assert min(norms) > 0.05 and norms == pytest.approx(trainer_norms, rel=1e-5)
    torch.testing.assert_close(folded, clipped, rtol=1e-5, atol=1e-6)
    assert (folded - unclipped).abs().max() > 1e-3


def test_bf16_weight_copies_train_like_autocast_and_follow_the_weights():
    """fused_projections(bf16_weights=True): every trainable Linear but the head runs on a bf16
    copy of its weights (one per fused group); trained under bf16 autocast with the copies
    refreshed after each AdamW step, the weights end where autocast's own casts take them, the
    copies equal the weights in bf16, the traced graph leaves only the head to autocast, and
    nothing is left on the model afterwards."""
    from codex_ml.modeling import apply_lora
    from codex_ml.params import Lora

    x = torch.randint(0, 64, (4, 16))

    def train(with_copies: bool, steps: int = 5):
        torch.manual_seed(0)
        model = tiny_llama()
        with engine.fused_projections(model, "all", bf16_weights=with_copies) as copies:
            assert bool(copies) == with_copies
            # AdamW16 runs torch's AdamW on a CPU, then refreshes the copies.
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
                assert torch.equal(attn.q_proj._w16, want.to(torch.bfloat16))
                assert torch.equal(mlp.down_proj._w16, mlp.down_proj.weight.to(torch.bfloat16))
                assert not hasattr(model.lm_head, "_w16") and not hasattr(attn.k_proj, "_w16")
                graphs = []
                torch._dynamo.reset()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    torch.compile(model, fullgraph=True, backend=lambda gm, ex: graphs.append(gm)
                                  or gm.forward)(input_ids=x)
                torch._dynamo.reset()
                linears = [n for g in graphs for n in g.graph.nodes if n.target is torch._C._nn.linear]
                assert len(linears) == 1, linears  # only the head is left to autocast
        assert not any("forward" in vars(m) or "_w16" in m._buffers for m in model.modules())
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    # On a CPU the weight gradient is rounded to bf16 after its matmul, as under autocast (fp32
    # out of the matmul is a CUDA kernel), so the two train to the same weights bit for bit.
    want, got = train(False), train(True)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)

    lora = apply_lora(tiny_llama(), Lora(enabled=True, target_modules=["q_proj", "v_proj"]))
    with engine.fused_projections(lora, "all", bf16_weights=True):
        copied = {n.split(".")[-2] for n, m in lora.named_modules() if "_w16" in m._buffers}
        assert copied == {"lora_A", "lora_B"}  # the frozen base layers keep autocast


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


def test_fused_projections_compile_under_ddp_graph_splitting(monkeypatch):
    """DDP's graph splitting (dynamo's DDPOptimizer) copies the traced graph's input sources; with
    the layers' state reached through function defaults it failed on torch 2.11 (the GPU image's:
    "DefaultsSource.__init__() takes from 3 to 4 positional arguments"). A one-rank DDP model
    with small buckets (several graphs) compiles and gives the unwrapped model's loss."""
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    x = torch.randint(0, 64, (2, 16))
    with one_rank_group(monkeypatch), engine.fused_projections(model, "all", bf16_weights=True), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=x, labels=x).loss
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
        torch._dynamo.reset()
        got = torch.compile(ddp, backend="aot_eager")(input_ids=x, labels=x).loss
        got.backward()
        torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    assert all(p.grad is not None for p in model.parameters())


def test_deferred_logs_read_fsdps_dtensor_gradient_norm(workspace, tmp_path, monkeypatch):
    """Under FSDP the Trainer's gradient norm is a DTensor (partial on each rank until reduced);
    deferred logs failed on two GPUs copying it to the host ("aten.copy_.default got mixed
    torch.Tensor and DTensor", session 14). They log its whole value: the Trainer's own norms."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    from codex_ml import modeling

    lagging_logs(monkeypatch)
    call = engine.DeferredLogs.__call__

    def as_under_fsdp(self, tr_loss, grad_norm, *a, **kw):
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = DTensor.from_local(grad_norm, mesh, [Partial()])
        return call(self, tr_loss, grad_norm, *a, **kw)
    monkeypatch.setattr(engine.DeferredLogs, "__call__", as_under_fsdp)
    p = params(train=dict(max_steps=6, log_every=2, eval_every=100, save_every=100))
    tok, tr, va = tiny_blocks(workspace)
    norms = {}
    with one_rank_group(monkeypatch):
        mesh = init_device_mesh("cpu", (1,))
        for deferred in (False, True):
            monkeypatch.setattr(engine, "DEFERRED_LOGS", deferred)
            torch.manual_seed(p.seed)
            model = modeling.build(p.model, tok, 32)
            trainer, _ = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path / str(deferred))
            norms[deferred] = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
    assert len(norms[True]) == 4 and all(isinstance(n, float) for n in norms[True])
    assert norms[True] == pytest.approx(norms[False], rel=1e-6)


def test_wide_cat_slices_lowers_only_wide_last_dim_concatenations_to_slices():
    """Under wide_cat_slices a last-dim cat of inputs >= 256 wide is lowered as slices that each
    producer writes (aliases of one output buffer), a narrow one keeps inductor's pointwise cat (a
    kernel named for the cat, with a masked load per input), results are the same, and inductor's
    lowering and config are back afterwards. On a CPU inductor always lowers cat to slices, unless
    force_pointwise_cat, which routes it through the helper the context swaps."""
    import torch._inductor.config as ic
    from torch._inductor import lowering
    from torch._inductor.utils import run_and_get_code

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
        with engine.wide_cat_slices(True):
            assert ic.post_grad_custom_post_pass.uuid()
            got = {w: lowered(w) for w in (32, 256)}
        assert lowering.pointwise_cat is plain and ic.post_grad_custom_post_pass is None
    pointwise = {"pointwise": True, "slices": 0}
    assert want == {32: pointwise, 256: pointwise}, want
    assert got == {32: pointwise, 256: {"pointwise": False, "slices": 2}}, got


def test_fused_projections_make_one_matmul_per_group_with_the_same_loss_and_gradients():
    """q/k/v (and with `all` gate/up) run as one matmul each (the model's own forward code
    unchanged, no graph break); logits and every parameter's gradient match the separate layers';
    LoRA-wrapped projections keep their own matmuls; everything is back afterwards."""
    from codex_ml.modeling import apply_lora
    from codex_ml.params import Lora

    torch.manual_seed(0)
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 16))

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
        with engine.fused_projections(model, which):
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
        assert not any("forward" in vars(m) for m in model.modules())

    lora = apply_lora(model, Lora(enabled=True, target_modules=["q_proj", "v_proj"]))
    unfused = linears(lora)
    with engine.fused_projections(lora, "all"):
        assert linears(lora) == unfused - layers  # only gate/up fused: q, k, v keep their own
    with engine.fused_projections(model, ""):
        assert not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("on", [True, False])
def test_bf16_training_keeps_the_residual_stream_in_bf16(workspace, tmp_path, monkeypatch, on):
    """Under bf16 autocast the blocks add bf16 to bf16 (the stream no longer inherits the fp32
    embedding's dtype), only while training: the model's own forward is fp32 again afterwards."""
    from codex_ml import modeling

    monkeypatch.setattr(engine, "BF16_RESIDUAL", on)
    p = params(train=dict(max_steps=2, precision="bf16", save_every=1000, eval_every=1000))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    seen = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
    engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)
    assert seen and set(seen) == {torch.bfloat16 if on else torch.float32}
    seen.clear()
    model(input_ids=tr[:1])
    hook.remove()
    assert seen == [torch.float32]


class Lagging:
    """A CUDA event's stand-in for deferred logs on a CPU: the log's copy lands after three more
    queries, or when waited for, and the GPU's time between two logs is 50 ms a step."""

    def __init__(self, step):
        self.left, self.step = 3, step

    def elapsed_time(self, later):
        return 50.0 * (later.step - self.step)

    def query(self):
        self.left -= 1
        return self.left < 0

    def synchronize(self):
        self.left = 0


def lagging_logs(monkeypatch):
    monkeypatch.setattr(engine.DeferredLogs, "devices", ("cpu",))
    monkeypatch.setattr(engine.DeferredLogs, "event",
                        lambda self, device: Lagging(self.trainer.state.global_step))


def test_deferred_logs_give_the_trainers_own_history_with_evals_and_checkpoints(workspace, tmp_path,
                                                                              monkeypatch):
    """Logs whose loss copy lands only some steps later (as on a GPU with the host ahead) make the
    same history as the Trainer's own reads: the same losses, norms and learning rates at the same
    steps, each train log before the evaluation of its step, and every log in the checkpoints'
    trainer_state.json; the checkpoint of a run with deferred logs resumes."""
    from codex_ml import modeling

    lagging_logs(monkeypatch)
    late, emit = [], engine.DeferredLogs.emit

    def recorded(self, vals, meta, start_time=None):
        late.append(self.trainer.state.global_step - meta["step"])
        return emit(self, vals, meta, start_time)
    monkeypatch.setattr(engine.DeferredLogs, "emit", recorded)
    p = params(train=dict(max_steps=23, save_every=10, eval_every=10, log_every=2))
    tok, tr, va = tiny_blocks(workspace)
    runs = {}
    for deferred in (False, True):
        monkeypatch.setattr(engine, "DEFERRED_LOGS", deferred)
        torch.manual_seed(p.seed)
        model = modeling.build(p.model, tok, 32)
        trainer, res = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path / str(deferred))
        assert isinstance(trainer._maybe_log_save_evaluate, engine.DeferredLogs) is deferred
        timing = ("tokens_per_s", "runtime", "per_second")
        hist = [{k: v for k, v in h.items() if not k.endswith(timing)} for h in trainer.state.log_history]
        saved = json.loads((tmp_path / str(deferred) / "checkpoint-20" / "trainer_state.json").read_text())
        runs[deferred] = hist, saved, res, trainer.state.log_history, trainer.state.total_flos
    (hist, saved, res, _, flos), (hist2, saved2, res2, raw, flos2) = runs[False], runs[True]
    assert [h["step"] for h in hist if "loss" in h] == [1, *range(2, 23, 2)]
    assert hist2 == hist and max(late) >= 2 and 0 in late  # made later, and at once at evals
    # The flos are stored at checkpoints and at the end only, not at each log: the same totals.
    assert flos2 == flos > 0 and saved2["total_flos"] == saved["total_flos"] > 0
    saved, saved2 = saved["log_history"], saved2["log_history"]
    assert [h["step"] for h in saved2] == [h["step"] for h in saved] and saved2[-2]["step"] == 20
    assert res2.final_train_loss == res.final_train_loss and res2.best_val_loss == res.best_val_loss
    # tokens/s from the GPU's time between logs (4 x 32 tokens in 50 ms), except the first log
    # and the first after each evaluation and checkpoint: those are timed on the host as before.
    rates = {h["step"]: h["tokens_per_s"] for h in raw if "tokens_per_s" in h}
    assert {s for s, r in rates.items() if r == 128 / 0.05} == {2, 4, 6, 8, 10, 14, 16, 18, 20}, rates
    # Resuming the deferred run's checkpoint at step 20 trains on to 23 with the same history.
    torch.manual_seed(p.seed)
    model = modeling.build(p.model, tok, 32)
    trainer, _ = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path / "resumed",
                              resume_from=tmp_path / "True" / "checkpoint-20")
    assert [h["step"] for h in trainer.state.log_history if "loss" in h][-2:] == [20, 22]
