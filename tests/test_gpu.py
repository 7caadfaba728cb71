"""The train stage on CUDA GPUs: its GPU defaults (bf16, compile with CUDA graphs), the attention
backend choice, and DDP on two GPUs resuming after kill -9 of the whole job. Skipped on CPU;
run on a GPU machine with `pytest -m gpu` (bench/gpu_ddp.sh does)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from test_training import params, stage, stage_dir, workspace  # noqa: F401 (a fixture)

from codex_ml import modeling
from codex_ml.training import checkpoints, engine
from codex_ml.training.data import pack_split

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gpus() -> int:
    return torch.cuda.device_count()


def tiny_run(workspace, tmp_path, **train):
    p = params(train=dict(dict(max_steps=40, save_every=1000, eval_every=20, log_every=5), **train))
    tok = modeling.load_tokenizer(workspace / "models" / "tokenizer")
    tr = pack_split(workspace / "data" / "splits", "train", tok, 32)
    va = pack_split(workspace / "data" / "splits", "val", tok, 32)
    torch.manual_seed(p.seed)
    model = modeling.build(p.model, tok, 32)
    return engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)


def test_gpu_defaults_bf16_compiled_with_cuda_graphs_and_the_loss_falls(workspace, tmp_path):
    trainer, res = tiny_run(workspace, tmp_path)
    assert (res.precision, res.compiled, res.compile_mode) == ("bf16", True, "reduce-overhead")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert res.steps == 40 and losses[-1] < losses[0] - 0.5, losses
    assert res.final_val_loss < 5.5 and res.steady_tokens_per_s > 0
    # CUDA graphs replay into static buffers: the weights must still be the trained ones.
    assert next(trainer.model.parameters()).is_cuda


def test_attention_backends_agree(workspace, tmp_path):
    finals = {}
    for choice in ("flash", "cudnn", "efficient", "math"):
        _, res = tiny_run(workspace, tmp_path / choice, attention=choice, compile="off",
                          max_steps=20)
        finals[choice] = res.final_val_loss
    assert max(finals.values()) - min(finals.values()) < 0.1, finals


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_ddp_two_gpus_resumes_after_kill_9_of_the_whole_job(workspace, tmp_path):
    # Not compiled: the compiled DDP path is bench/gpu_ddp.sh's; this is about resuming.
    train = dict(max_steps=300, save_every=20, eval_every=20, devices=2, distributed="ddp",
                 compile="off")
    ref = stage(stage_dir(workspace, tmp_path / "ref", train=train))
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]

    cut = stage_dir(workspace, tmp_path / "cut", train=train)
    victim = stage(cut, start_new_session=True)  # torchrun and both ranks in one process group
    marker = cut / "models" / "checkpoints" / "checkpoint-20" / checkpoints.MARKER
    deadline = time.time() + 600
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), victim.stdout.read()[-3000:] if victim.poll() is not None else ""
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (cut / "models" / "model").exists()

    resumed = stage(cut)
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    m = json.loads((cut / "metrics" / "train.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 300, m
    assert 20 <= m["resumed_from_step"] < 300 and m["tokens"] > 0, m  # resumed mid-run
    # Written once, by rank 0: one model, one set of checkpoints (best 2 + latest).
    assert len(list((cut / "models" / "checkpoints").glob("checkpoint-*"))) <= 3
    # Same data order after the resume; bf16 and NCCL reductions are not bit-exact, so compare
    # where both runs end up rather than the bits.
    r = json.loads((tmp_path / "ref" / "metrics" / "train.json").read_text())
    assert abs(r["final_val_loss"] - m["final_val_loss"]) < 0.05, (r, m)


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_fsdp_two_gpus_trains_and_saves_a_loadable_model(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    d = stage_dir(workspace, tmp_path / "fsdp",
                  train=dict(max_steps=20, devices=2, distributed="fsdp", compile="off"))
    run = stage(d)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    m = json.loads((d / "metrics" / "train.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 20
    model = AutoModelForCausalLM.from_pretrained(d / "models" / "model")
    assert sum(p.numel() for p in model.parameters()) == m["params"]
