"""The train stage on CUDA GPUs: its GPU defaults (bf16, compiled; CUDA graphs as an option), the
attention backend choice, DDP on two GPUs resuming after kill -9 of the whole job, FSDP. Skipped
on CPU; run on a GPU machine with `pytest -m gpu` (bench/gpu_ddp.sh does)."""

from __future__ import annotations

import json

import pytest
import torch
from test_training import ddp_kill_and_resume, params, stage, stage_dir  # noqa: F401
from test_training import workspace  # noqa: F401 (a fixture)

from codex_ml import modeling
from codex_ml.training import engine
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


@pytest.mark.parametrize("mode", ["auto", "reduce-overhead"])
def test_gpu_defaults_bf16_compiled_and_the_loss_falls(workspace, tmp_path, mode):
    trainer, res = tiny_run(workspace, tmp_path, compile_mode=mode)
    expected = "default" if mode == "auto" else mode
    assert (res.precision, res.compiled, res.compile_mode) == ("bf16", True, expected)
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
    # The stage relaunches itself under torchrun (devices: 2). Not compiled: the compiled DDP path
    # is bench/gpu_ddp.sh's; this is about resuming.
    ddp_kill_and_resume(workspace, tmp_path, train=dict(
        max_steps=300, save_every=20, eval_every=20, devices=2, distributed="ddp", compile="off"))


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
