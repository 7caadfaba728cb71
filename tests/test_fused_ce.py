"""The engine's fused linear cross-entropy (codex_ml/training/fused_ce.py) on the CPU: the torch
path of the op, the loop's loss module (engine.CausalLMLoss), and the engine's
choice (transforms.resolve). The Triton kernel itself is checked
against the torch path by tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from test_training import params, tiny_blocks, tiny_llama
from test_training import workspace  # noqa: F401 (a fixture)

from codex_ml import modeling
from codex_ml.stage import UserError
from codex_ml.training import engine, fused_ce


def test_the_fused_loss_module_traces_as_one_graph_and_never_makes_logits():
    """The loss module with the fused loss is one dynamo graph without breaks, and the head module
    is never called (its weight goes to the op): no logits are made."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=96, tie_word_embeddings=True).train()
    x = torch.randint(0, 96, (3, 20))
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    mod = engine.CausalLMLoss(model, fused=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(mod)(x, x)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    mod(x, x).backward()
    assert not calls


def test_fused_loss_compiles_with_inductor():
    """Compiled end to end (inductor lowers the op to a call): the same loss and gradients as
    eager. Before, an op argument named `kernel` broke inductor's lowering (H200 run, 2026-11-30)."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=96).train()
    x = torch.randint(0, 96, (2, 16))
    mod = engine.CausalLMLoss(model, fused=True)
    want = mod(x, x)
    want.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    got = torch.compile(mod)(x, x)
    got.backward()
    torch._dynamo.reset()
    assert abs(got.item() - want.item()) < 1e-4
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), grads))


def test_fused_loss_under_lora_trains_the_adapters_the_same_and_skips_the_frozen_heads_gradient():
    from codex_ml.params import Lora

    torch.manual_seed(0)
    model = modeling.apply_lora(tiny_llama(vocab_size=96), Lora(target_modules=["q_proj", "v_proj"], dropout=0.0))
    x = torch.randint(0, 96, (2, 16))
    engine.CausalLMLoss(model, fused=False)(x, x).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    calls = []
    model.get_base_model().lm_head.register_forward_hook(lambda *a: calls.append(1))
    engine.CausalLMLoss(model, fused=True)(x, x).backward()
    assert not calls and want
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, want[n], atol=1e-5), n
    total, gh, gw = fused_ce.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4),
                                                  torch.tensor([0, 1, 2]), weight_grad=False)
    assert gw.numel() == 0 and gh.shape == (3, 4)


def test_the_op_gives_zero_loss_and_gradient_for_ignored_rows():
    torch.manual_seed(0)
    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64)
    y = torch.tensor([3, -100, -100, 9])
    total, gh, gw = fused_ce.linear_cross_entropy(h, w, y)
    want = torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum")
    assert torch.allclose(total, want.float())
    assert gh[1:3].abs().max() == 0
    h.requires_grad_(True)
    w.requires_grad_(True)
    torch.nn.functional.cross_entropy(h @ w.t(), y, reduction="sum").backward()
    assert torch.allclose(gh, h.grad) and torch.allclose(gw, w.grad)


def test_the_loops_loss_module_is_the_summed_token_loss_either_way():
    """engine.CausalLMLoss, the training graph: fused or the model's own, the summed loss over the
    counted tokens (labels shifted by one, -100 ignored; the loop divides by the step's count)
    with the same gradients, including the tied embedding's."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=96, tie_word_embeddings=True).train()
    x = torch.randint(0, 96, (3, 20))
    labels = x.clone()
    labels[0, 5:9] = -100
    logits = model(input_ids=x).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1),
                                             reduction="sum")
    assert engine.counted(labels) == 3 * 19 - 4
    grads = {}
    for fused in (False, True):
        model.zero_grad()
        loss = engine.CausalLMLoss(model, fused)(x, labels)
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_engine_trains_the_same_curve_with_the_fused_loss(workspace, tmp_path):  # noqa: F811
    """On the CPU the default is the model's own loss; asked for, the fused loss trains the same
    run (fp32: the same losses to float rounding) and says so in the result."""
    tok, tr, va = tiny_blocks(workspace)
    curves = {}
    for choice in ("auto", "fused"):
        p = params(train=dict(max_steps=8, eval_every=1000, save_every=1000, log_every=2,
                              engine=dict(loss=choice)))
        torch.manual_seed(p.seed)
        model = modeling.build(p.model, tok, 32)
        head_calls = []  # the fused loss reads lm_head's weight and never calls the module
        model.lm_head.register_forward_hook(lambda m, a, o: head_calls.append(m.training))
        out = engine.train(model, tr, va, p.train, seed=p.seed, out_dir=tmp_path / choice)
        res = out.result
        curves[res.loss] = [h["loss"] for h in out.state.log_history if "loss" in h]
        assert res.final_val_loss is not None
        assert any(head_calls) == (res.loss == "model")
        assert False in head_calls  # evaluation: the model's own forward either way
    assert set(curves) == {"model", "fused"}
    assert curves["fused"] == pytest.approx(curves["model"], abs=1e-4), curves


def test_fused_loss_where_it_cannot_stand_in_is_refused_or_left_off():
    from codex_ml.params import Lora, Train
    from codex_ml.training import transforms

    def loss(choice, model, sharded=False):
        return transforms.resolve(Train(engine=dict(loss=choice)), model, sharded=sharded).loss

    plain = tiny_llama()
    assert loss("auto", plain) == "model"  # CPU
    assert loss("fused", plain) == "fused"
    assert loss("model", plain) == "model"
    lora_head = modeling.apply_lora(tiny_llama(), Lora(target_modules=["q_proj", "lm_head"]))
    assert fused_ce.applies(modeling.apply_lora(tiny_llama(), Lora(target_modules=["q_proj"]))) is None
    with pytest.raises(UserError, match="train.engine.loss = fused: .*lm_head.*use auto or model"):
        loss("fused", lora_head)
    assert loss("auto", lora_head) == "model"
    with pytest.raises(UserError, match="train.engine.loss = fused: FSDP shards lm_head"):
        loss("fused", plain, sharded=True)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert "GPT2LMHeadModel is not one of" in fused_ce.applies(gpt2)
    with pytest.raises(UserError, match="GPT2LMHeadModel is not one of"):
        loss("fused", gpt2)
