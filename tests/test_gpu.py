"""The train stage on CUDA GPUs: its GPU defaults (bf16, compiled with CUDA graphs, the fused loss,
every train.engine lever auto-on), the compile modes, the deferred logs, the fused clip, the
attention backend choice, DDP on two GPUs resuming after kill -9 of the whole job, FSDP. Skipped
on CPU; run on a GPU machine with `pytest -m gpu` (bench/gpu_ddp.sh does)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_training import ddp_kill_and_resume, params, stage, stage_dir, tiny_blocks  # noqa: F401
from test_training import workspace  # noqa: F401 (a fixture)

from codex_ml import modeling
from codex_ml.training import adamw, engine, transforms

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def gpus() -> int:
    return torch.cuda.device_count()


def tiny_run(workspace, tmp_path, model=None, engine_=None, on_step=None, **train):
    """engine.train on the tiny model with these train keys (train.engine levers in `engine_`)."""
    p = params(train=dict(dict(max_steps=40, save_every=1000, eval_every=20, log_every=5), **train,
                          engine=engine_ or {}), model=model or {})
    tok, tr, va = tiny_blocks(workspace)
    torch.manual_seed(p.seed)
    model = modeling.build(p.model, tok, 32)
    return engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path, on_step=on_step)


def watch(monkeypatch) -> dict:
    """The run's Plan and optimizer, as the engine made them."""
    seen = {}
    resolve, optimizer = transforms.resolve, engine._optimizer

    def plan(*a, **k):
        seen["plan"] = resolve(*a, **k)
        return seen["plan"]

    def opt(*a, **k):
        seen["opt"] = optimizer(*a, **k)
        return seen["opt"]
    monkeypatch.setattr(transforms, "resolve", plan)
    monkeypatch.setattr(engine, "_optimizer", opt)
    return seen


@pytest.mark.parametrize("mode", ["auto", "reduce-overhead", "default"])
def test_gpu_defaults_bf16_compiled_and_the_loss_falls(workspace, tmp_path, monkeypatch, mode):
    """The GPU's defaults: bf16, compiled (auto: CUDA graphs), the fused loss, and every lever on
    (fused q/k/v and gate/up with the wide-cat lowering, bf16 weight copies, AdamW16 with the clip
    in its grad_scale, deferred logs, causal attention, the RoPE table, the bf16 residual)."""
    seen = watch(monkeypatch)
    torch._dynamo.reset()
    out = tiny_run(workspace, tmp_path, engine_=dict(compile_mode=mode))
    torch._dynamo.reset()
    res, hist = out.result, out.state.log_history
    expected = "reduce-overhead" if mode == "auto" else mode
    assert (res.precision, res.compiled, res.compile_mode, res.loss) == ("bf16", True, expected, "fused")
    plan = seen["plan"]
    assert plan.fused_proj == ("all" if transforms.inductor_cat.available() else "")
    assert (plan.bf16_weights, plan.fused_adamw, plan.fused_clip, plan.deferred_logs, plan.causal_attention,
            plan.rope_table, plan.bf16_residual) == (True,) * 7, plan
    losses = [h["loss"] for h in hist if "loss" in h]
    assert res.steps == 40 and losses[-1] < losses[0] - 0.5, losses
    assert res.final_val_loss < 5.5 and res.steady_tokens_per_s > 0
    # CUDA graphs replay into static buffers: the weights must still be the trained ones.
    assert next(out.model.parameters()).is_cuda
    assert not any(isinstance(m, (transforms.FusedAttention, transforms.FusedMLP, transforms.Linear16Module))
                   for m in out.model.modules())  # undone
    # The clip factor went to AdamW16 (grad_scale); the logs have the pre-clip norms.
    opt = seen["opt"]
    assert opt.grad_scale.item() >= 1.0
    # AdamW ran as the Triton kernel (its address tables exist) and wrote the bf16 weight copies,
    # which the forward reads: stale copies would not have let the loss fall.
    assert isinstance(opt, adamw.AdamW16) and opt._tables and not opt.copies  # released after train
    assert all(h["grad_norm"] > 0 for h in hist if "loss" in h)
    assert [h["step"] for h in hist if "loss" in h] == [1, *range(5, 41, 5)]


def test_deferred_logs_give_the_same_history_as_reading_at_once(workspace, tmp_path):
    """deferred_logs: the log values copied to pinned memory behind the step and emitted when the
    copy has landed make the history of reading them at once: the same steps, losses, norms,
    learning rates, each train log before its step's evaluation. Not compiled: the same kernels
    either way."""
    runs = {}
    for choice in ("on", "off"):
        out = tiny_run(workspace, tmp_path / choice, max_steps=23, eval_every=10, save_every=10,
                       log_every=2, engine_=dict(deferred_logs=choice, compile="off"))
        runs[choice] = out
    timing = [[{k: v for k, v in h.items() if k != "tokens_per_s"} for h in runs[c].state.log_history]
              for c in ("on", "off")]
    assert [(h["step"], "loss" in h) for h in timing[0]] == [(h["step"], "loss" in h) for h in timing[1]]
    assert [h["step"] for h in timing[0] if "loss" in h] == [1, *range(2, 23, 2), 23]
    for a, b in zip(*timing):
        assert a.keys() == b.keys() and a == pytest.approx(b, rel=1e-3), (a, b)  # GPU atomics
    rates = [h["tokens_per_s"] for h in runs["on"].state.log_history if "tokens_per_s" in h]
    assert len(rates) >= 10 and all(r > 0 for r in rates)


def test_logs_deferred_emit_in_order_once_the_copies_land():
    """engine.Logs(deferred=True) on CUDA tensors: nothing read at add (the copy may not have
    landed), every record emitted in order by the flush, the values of the non-deferred records,
    tokens/s from CUDA events."""
    recs = {True: [], False: []}
    for deferred in (True, False):
        logs = engine.Logs(deferred, 256, recs[deferred].append)
        logs.restart(0)
        for step in range(1, 6):
            a = torch.randn(512, 512, device="cuda")
            for _ in range(20):  # work queued behind the log's copy
                a = a @ a / 512
            logs.add(step, torch.tensor(float(step), device="cuda") * 2, 2,
                     torch.tensor(0.5 * step, device="cuda"), 1e-3 * step, step / 10)
        logs.poll(flush=True)
        assert not logs.pending
    strip = [[{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs[d]] for d in (True, False)]
    assert strip[0] == strip[1] and [r["step"] for r in recs[True]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in recs[True]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(r["tokens_per_s"] > 0 for r in recs[True])


def test_fused_clip_trains_like_clipping_first(workspace, tmp_path):
    """fused_clip (the clip factor as AdamW16's grad_scale) against clip_grad_norm_ then the step:
    the same weights and pre-clip norms within bf16 rounding, clipping active (max_grad_norm
    small), not compiled."""
    runs = {}
    for choice in ("on", "off"):
        out = tiny_run(workspace, tmp_path / choice, max_steps=10, log_every=1, max_grad_norm=0.05,
                       engine_=dict(fused_clip=choice, compile="off"))
        norms = [h["grad_norm"] for h in out.state.log_history if "grad_norm" in h]
        runs[choice] = torch.cat([p.detach().flatten() for p in out.model.parameters()]), norms
    (a, na), (b, nb) = runs["on"], runs["off"]
    assert min(na) > 0.05 and na == pytest.approx(nb, rel=1e-2)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


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


def test_cublas_goes_without_a_workspace_only_under_cuda_graphs_on_hopper():
    """The setting transforms.process_env makes for graph-replayed steps (its memsets are graph
    nodes with gaps); never without graphs (auto), always with off, never with on. The stage sets
    it with os.environ.setdefault: never over the user's own value."""
    from codex_ml.params import Train

    off = {"CUBLAS_WORKSPACE_CONFIG": ":0:0", "CUBLASLT_WORKSPACE_SIZE": "0"}
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert transforms.process_env(Train(), sharded=False) == (off if hopper else {})
    assert transforms.process_env(Train(engine=dict(compile_mode="default")), sharded=False) == {}
    assert transforms.process_env(Train(grad_accum=2), sharded=False) == {}  # no graphs
    assert transforms.process_env(Train(engine=dict(compile="off")), sharded=False) == {}
    assert transforms.process_env(Train(engine=dict(cublas_workspace="off", compile_mode="default")),
                                  sharded=False) == off
    assert transforms.process_env(Train(engine=dict(cublas_workspace="on")), sharded=False) == {}


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
        got = transforms.Linear16.apply(x, torch.cat(ws).detach().bfloat16(), *ws)
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
        out = tiny_run(workspace, tmp_path / choice, engine_=dict(attention=choice, compile="off"),
                       max_steps=20)
        finals[choice] = out.result.final_val_loss
    assert max(finals.values()) - min(finals.values()) < 0.1, finals


def test_engine_steps_never_wait_for_the_gpu(workspace, tmp_path):
    """No host-GPU sync in training steps, a logging step among them: a blocking batch copy was one
    (1.6 per step at GPT-2-small shape, 6% of the throughput on an H200), reading the loss and
    gradient norm at each log two more (engine.Logs defers them), the host's count of a step's
    tokens another (engine.counted: from the CPU batch)."""
    import traceback
    import warnings
    from pathlib import Path

    # Not "synchroniz": turning the mode on warns "Synchronization debug mode is a prototype".
    SYNC_WARNING = "called a synchronizing CUDA operation"

    def on_step(step):  # steps 2-9: the log at step 5, not the last step's evaluation
        if step == 1:
            torch.cuda.set_sync_debug_mode("warn")
        elif step == 9:
            torch.cuda.set_sync_debug_mode(0)

    syncs = []

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):  # where from: the innermost frames
            frames = traceback.extract_stack()[:-1][::-1][:6]
            syncs.append(" < ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:"
                                    f"{f.lineno} {f.name}" for f in frames))

    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=SYNC_WARNING)
        warnings.showwarning = show
        try:
            out = tiny_run(workspace, tmp_path, max_steps=10, log_every=5, eval_every=1000,
                           engine_=dict(compile="off"), on_step=on_step)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert not syncs, syncs
    assert [h["step"] for h in out.state.log_history if "loss" in h] == [1, 5, 10]


ATTENTION_KERNELS = {  # how each SDPA backend's CUDA kernels are named (cuDNN's say "flash" too)
    "flash": lambda n: "flash" in n and "cudnn" not in n,
    "cudnn": lambda n: "cudnn" in n,
    "efficient": lambda n: "fmha" in n or "efficient" in n,
}


def test_compiled_engine_runs_the_chosen_attention_kernel(workspace, tmp_path):
    """Under torch.compile transformers passed SDPA an explicit mask, so the choice was ignored
    (cuDNN's masked kernel ran for every choice on an H200); causal_attention fixes that.
    And compile's caches ignore the global SDPA flags, so the choice must be part of the graph
    (transforms._pinned): before that, `flash` after `auto` ran cuDNN's kernel."""
    for choice, is_it in ATTENTION_KERNELS.items():
        torch._dynamo.reset()  # else the next model reuses this one's traced graph (and kernel)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            # Head dim 64, no GQA: a shape every one of the three kernels takes.
            tiny_run(workspace, tmp_path / choice, engine_=dict(attention=choice, compile="on"),
                     max_steps=3, model=dict(hidden_size=128, n_heads=2, n_kv_heads=2))
        names = {e.key.lower() for e in prof.key_averages() if e.self_device_time_total > 0}
        attn = [n for n in names if any(f(n) for f in ATTENTION_KERNELS.values())]
        assert attn and all(is_it(n) for n in attn), (choice, attn)
    torch._dynamo.reset()


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_ddp_two_gpus_resumes_after_kill_9_of_the_whole_job(workspace, tmp_path):
    # The stage relaunches itself under torchrun (devices: 2). Not compiled: the compiled DDP path
    # is bench/gpu_ddp.sh's; this is about resuming.
    ddp_kill_and_resume(workspace, tmp_path, train=dict(
        max_steps=300, save_every=20, eval_every=20, devices=2, distributed="ddp",
        engine=dict(compile="off")))


@pytest.mark.skipif(gpus() < 2, reason="needs two GPUs")
def test_one_device_on_a_two_gpu_host_trains_on_one_gpu(workspace, tmp_path):
    """train.devices: 1 with two GPUs visible: one process on one GPU (the Trainer had spread it
    over both with DataParallel, and the compiled model failed): the stage narrows
    CUDA_VISIBLE_DEVICES."""
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
                  train=dict(max_steps=20, devices=2, distributed="fsdp", engine=dict(compile="off")))
    run = stage(d)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-3000:]
    m = json.loads((d / "metrics" / "train.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 20
    model = AutoModelForCausalLM.from_pretrained(d / "models" / "model")
    assert sum(p.numel() for p in model.parameters()) == m["params"]
