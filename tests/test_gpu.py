"""The train stage on CUDA GPUs: its GPU defaults (bf16, compiled with CUDA graphs, the fused loss), the
attention backend choice, DDP on two GPUs resuming after kill -9 of the whole job, FSDP. Skipped
on CPU; run on a GPU machine with `pytest -m gpu` (bench/gpu_ddp.sh does)."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from test_training import ddp_kill_and_resume, params, stage, stage_dir, tiny_blocks  # noqa: F401
from test_training import workspace  # noqa: F401 (a fixture)

from codex_ml import modeling
from codex_ml.training import adamw, engine

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gpus() -> int:
    return torch.cuda.device_count()


def tiny_run(workspace, tmp_path, model=None, **train):
    p = params(train=dict(dict(max_steps=40, save_every=1000, eval_every=20, log_every=5), **train),
               model=model or {})
    tok, tr, va = tiny_blocks(workspace)
    torch.manual_seed(p.seed)
    model = modeling.build(p.model, tok, 32)
    return engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path)


@pytest.mark.parametrize("mode", ["auto", "reduce-overhead"])
def test_gpu_defaults_bf16_compiled_and_the_loss_falls(workspace, tmp_path, mode):
    trainer, res = tiny_run(workspace, tmp_path, compile_mode=mode)
    expected = "reduce-overhead"  # auto: CUDA graphs on a GPU
    assert (res.precision, res.compiled, res.compile_mode, res.loss) == ("bf16", True, expected, "fused")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert res.steps == 40 and losses[-1] < losses[0] - 0.5, losses
    assert res.final_val_loss < 5.5 and res.steady_tokens_per_s > 0
    # CUDA graphs replay into static buffers: the weights must still be the trained ones.
    assert next(trainer.model.parameters()).is_cuda
    # The clip factor went to fused AdamW (grad_scale), the Trainer logged the pre-clip norms.
    opt = trainer.optimizer.optimizer
    assert opt.grad_scale.item() >= 1.0
    # AdamW ran as the Triton kernel (its address tables exist) and wrote the bf16 weight copies,
    # which the forward reads: stale copies would not have let the loss fall.
    assert isinstance(opt, adamw.AdamW16) and opt._tables and not opt.copies  # released after train
    assert all(h["grad_norm"] > 0 for h in trainer.state.log_history if "loss" in h)


def test_adamw16_kernel_steps_like_torch_fused_adamw_and_writes_the_bf16_copies():
    """AdamW16's Triton kernel against torch's fused AdamW over six steps: two param groups (with
    and without weight decay), sizes that are no multiple of its block, a changing grad_scale (the
    engine's clip factor), new gradient tensors each step and the same ones again (its address
    table rebuilt, then reused); the copies equal the weights in bf16 exactly, and a state saved
    by torch's optimizer continues in AdamW16 as in torch's."""
    torch.manual_seed(0)
    shapes = [(2304, 768), (768,), (4097,), (3, 5), (1000, 768)]
    ref = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    copies = {mine[0]: torch.empty(shapes[0], device="cuda", dtype=torch.bfloat16),
              mine[2]: torch.empty(shapes[2], device="cuda", dtype=torch.bfloat16)}
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)

    def groups(ps):
        return [{"params": ps[:3], "weight_decay": 0.1}, {"params": ps[3:], "weight_decay": 0.0}]

    want, got = torch.optim.AdamW(groups(ref), **kw), adamw.AdamW16(groups(mine), copies=copies, **kw)
    grads = None
    for step in range(6):
        if step != 3:  # step 3 reuses step 2's gradient tensors
            grads = [torch.randn(s, device="cuda") for s in shapes]
        for ps in (ref, mine):
            for p, g in zip(ps, grads):
                p.grad = g.clone() if step != 3 else p.grad.copy_(g)
        want.grad_scale = got.grad_scale = torch.tensor(1.0 + step / 2, device="cuda")
        want.step()
        got.step()
    assert got._tables  # the kernel ran (torch's step would leave no tables)
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got.state[b][k], want.state[a][k], rtol=1e-5, atol=1e-7)
    for p, c in copies.items():
        assert torch.equal(c, p.detach().bfloat16())

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    cont = adamw.AdamW16(groups(resumed), **kw)
    cont.load_state_dict(copy.deepcopy(want.state_dict()))  # as from a file: no shared tensors
    grads = [torch.randn(s, device="cuda") for s in shapes]
    for ps in (ref, resumed):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
    want.grad_scale = cont.grad_scale = None
    want.step()
    cont.step()
    assert cont._tables
    for a, b in zip(ref, resumed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cublas_goes_without_a_workspace_only_under_cuda_graphs_on_hopper(monkeypatch):
    """The setting the engine makes for graph-replayed steps (its memsets are graph nodes with
    gaps); never without graphs, never over the user's own value."""
    for k in ("CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not engine.cublas_without_workspace("default")
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert engine.cublas_without_workspace("reduce-overhead") == hopper
    assert os.environ.get("CUBLASLT_WORKSPACE_SIZE") == ("0" if hopper else None)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # e.g. for deterministic algorithms
    assert not engine.cublas_without_workspace("reduce-overhead")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.parametrize("rows", [(8192, 16, False), (4096, 8, True)])
def test_fused_ce_kernel_matches_the_torch_path(monkeypatch, rows):
    """The Triton kernel (online softmax, gradient written over the logits in place) against the
    op's torch path, bf16 matmuls as in training: a vocab that is no power of two, ignored rows."""
    from codex_ml.training import fused_ce

    monkeypatch.setattr(fused_ce, "ROWS", rows)  # block, warps, the second pass's order
    torch.manual_seed(0)
    h = torch.randn(600, 64, device="cuda").bfloat16()
    w = (torch.randn(50_001, 64, device="cuda") * 0.3).bfloat16()
    y = torch.randint(0, 50_001, (600,), device="cuda")
    y[::7] = -100
    got = fused_ce.linear_cross_entropy(h, w, y, triton_rows=True)
    want = fused_ce.linear_cross_entropy(h, w, y, triton_rows=False)
    assert abs(got[0].item() - want[0].item()) < 1e-4 * abs(want[0].item())
    for a, b in zip(got[1:], want[1:]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    assert got[1][::7].abs().max().item() == 0  # ignored rows: no gradient


def test_linear16_on_cuda_matches_autocast_with_fp32_weight_gradients():
    """On CUDA Linear16's weight gradient comes out of the matmul in fp32 (aten::mm.dtype): the
    output and input gradient of autocast's F.linear, the weight gradient autocast's within its
    bf16 rounding (and not rounded itself), split by rows over a fused group's weights."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    x = torch.randn(4, 256, 192, device="cuda", requires_grad=True)
    ws = [torch.randn(n, 192, device="cuda", requires_grad=True) for n in (192, 64, 64)]
    dy = torch.randn(4, 256, 320, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = F.linear(x, torch.cat(ws))
    want.backward(dy)
    want_g = [t.grad.clone() for t in (x, *ws)]
    for t in (x, *ws):
        t.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = engine.Linear16.apply(x, torch.cat(ws).detach().bfloat16(), *ws)
    got.backward(dy)
    torch.testing.assert_close(got, want)  # the same bf16 matmul
    torch.testing.assert_close(x.grad, want_g[0], rtol=1e-2, atol=1e-2)
    for w, g in zip(ws, want_g[1:]):
        assert w.grad.dtype == torch.float32 and w.grad.shape == w.shape
        torch.testing.assert_close(w.grad, g, rtol=1e-2, atol=1e-2)
        assert not torch.equal(w.grad, w.grad.bfloat16().float())  # fp32, not rounded to bf16


def test_attention_backends_agree(workspace, tmp_path):
    finals = {}
    for choice in ("flash", "cudnn", "efficient", "math"):
        _, res = tiny_run(workspace, tmp_path / choice, attention=choice, compile="off",
                          max_steps=20)
        finals[choice] = res.final_val_loss
    assert max(finals.values()) - min(finals.values()) < 0.1, finals


def test_engine_steps_never_wait_for_the_gpu(workspace, tmp_path):
    """No host-GPU sync in training steps, a logging step among them: accelerate's blocking batch
    copy was one (1.6 per step at GPT-2-small shape, 6% of the throughput on an H200), the
    Trainer's reads of the loss and gradient norm at each log two more (engine.DeferredLogs)."""
    import traceback
    import warnings
    from pathlib import Path

    from transformers import TrainerCallback

    # Not "synchroniz": turning the mode on warns "Synchronization debug mode is a prototype".
    SYNC_WARNING = "called a synchronizing CUDA operation"

    class Watch(TrainerCallback):  # steps 2-9: the log at step 5, not the last step's evaluation
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 9:
                torch.cuda.set_sync_debug_mode(0)

    p = params(train=dict(max_steps=10, save_every=1000, eval_every=1000, log_every=5,
                          compile="off"))
    tok, tr, va = tiny_blocks(workspace)
    model = modeling.build(p.model, tok, 32)
    syncs = []

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):  # where from: the innermost frames
            frames = traceback.extract_stack()[:-1][::-1][:6]
            syncs.append(" < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:"
                                    f"{f.lineno} {f.name}" for f in frames))

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=SYNC_WARNING)
        warnings.showwarning = show
        trainer, _ = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path, callbacks=[Watch()])
    assert not syncs, syncs
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 5, 10]


ATTENTION_KERNELS = {  # how each SDPA backend's CUDA kernels are named (cuDNN's say "flash" too)
    "flash": lambda n: "flash" in n and "cudnn" not in n,
    "cudnn": lambda n: "cudnn" in n,
    "efficient": lambda n: "fmha" in n or "efficient" in n,
}


def test_compiled_engine_runs_the_chosen_attention_kernel(workspace, tmp_path):
    """Under torch.compile transformers passed SDPA an explicit mask, so the choice was ignored
    (cuDNN's masked kernel ran for every choice on an H200); engine.causal_attention fixes that.
    And compile's caches ignore the global SDPA flags, so the choice must be part of the graph
    (engine._pinned): before that, `flash` after `auto` ran cuDNN's kernel."""
    for choice, is_it in ATTENTION_KERNELS.items():
        torch._dynamo.reset()  # else the next model reuses this one's traced graph (and kernel)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            # Head dim 64, no GQA: a shape every one of the three kernels takes.
            tiny_run(workspace, tmp_path / choice, attention=choice, compile="on", max_steps=3,
                     model=dict(hidden_size=128, n_heads=2, n_kv_heads=2))
        names = {e.key.lower() for e in prof.key_averages() if e.self_device_time_total > 0}
        attn = [n for n in names if any(f(n) for f in ATTENTION_KERNELS.values())]
        assert attn and all(is_it(n) for n in attn), (choice, attn)
    torch._dynamo.reset()


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_ddp_two_gpus_resumes_after_kill_9_of_the_whole_job(workspace, tmp_path):
    # The stage relaunches itself under torchrun (devices: 2). Not compiled: the compiled DDP path
    # is bench/gpu_ddp.sh's; this is about resuming.
    ddp_kill_and_resume(workspace, tmp_path, train=dict(
        max_steps=300, save_every=20, eval_every=20, devices=2, distributed="ddp", compile="off"))


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_one_device_on_a_two_gpu_host_trains_on_one_gpu(workspace, tmp_path):
    """train.devices: 1 with two GPUs visible: one process on one GPU (the Trainer had spread it
    over both with DataParallel, and the compiled model failed)."""
    d = stage_dir(workspace, tmp_path / "one", train=dict(max_steps=20, devices=1))
    run = stage(d)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    m = json.loads((d / "metrics" / "train.json").read_text())
    prov = json.loads((d / "models" / "model" / "provenance.json").read_text())
    assert m["world_size"] == 1 and m["steps"] == 20 and len(prov["devices"]) == 1, (m, prov)


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
