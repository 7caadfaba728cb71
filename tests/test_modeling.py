"""Modeling: scratch sizing, pretrained loading, LoRA (targets, adapter-only training, merge)."""

from __future__ import annotations

import pytest
import torch

from codex_ml import modeling
from codex_ml.params import Lora, Model, Train
from codex_ml.stage import UserError
from codex_ml.training import engine

from test_training import make_tokenizer, one_thread, stdlib_texts  # noqa: F401 (autouse fixture)

TINY = Model(n_layers=2, hidden_size=32, n_heads=4, n_kv_heads=2, intermediate_size=64,
             context_length=32)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A 'pretrained' model directory as train_model writes it: weights + tokenizer files."""
    d = tmp_path_factory.mktemp("base")
    tok = modeling.load_tokenizer(make_tokenizer(d, stdlib_texts(6)))
    torch.manual_seed(0)
    modeling.build_scratch(TINY, tok, 32).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def blocks(base_dir):
    from codex_ml.training.data import pack

    return pack(stdlib_texts(6), modeling.load_tokenizer(base_dir), 32)


def test_scratch_model_is_sized_to_the_tokenizer(base_dir):
    tok = modeling.load_tokenizer(base_dir)
    m = modeling.build_scratch(TINY, tok, 32)
    assert m.config.vocab_size == len(tok) and m.config.num_key_value_heads == 2
    with pytest.raises(UserError, match="context_length"):
        modeling.build_scratch(TINY, tok, 64)


def test_missing_pretrained_base_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="model.base"):
        modeling.load_pretrained(str(tmp_path / "nope"))


def test_bad_lora_targets_list_the_valid_names(base_dir):
    model = modeling.load_pretrained(str(base_dir))
    with pytest.raises(UserError) as e:
        modeling.apply_lora(model, Lora(enabled=True, target_modules=["q_proj", "query"]))
    msg = str(e.value)
    assert "['query']" in msg and "q_proj" in msg and "down_proj" in msg


def test_lora_trains_only_adapters_loads_back_and_merges(base_dir, blocks, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_sd = {k: v.clone() for k, v in modeling.load_pretrained(str(base_dir)).state_dict().items()}
    model = modeling.apply_lora(modeling.load_pretrained(str(base_dir)),
                                Lora(enabled=True, r=4, alpha=8, dropout=0.0,
                                     target_modules=["q_proj", "v_proj", "up_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    t = Train(block_size=32, batch_size=4, lr=1e-2, warmup_steps=0, max_steps=8, eval_every=100,
              save_every=100, eval_batches=1)
    engine.train(model, blocks, blocks[:4], t, seed=0, out_dir=tmp_path / "ck")

    # Base weights untouched, adapters moved.
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), base_sd[key]), name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    x = blocks[:2]
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                       tmp_path / "adapter").eval()
    merged = modeling.merge(model).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


def test_generate_samples_reproducibly_and_a_missing_model_is_a_clear_error(base_dir, tmp_path):
    from codex_ml.modeling.generate import generate, load

    model, tok = load(base_dir)
    a = generate(model, tok, "def f(", max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert a == generate(model, tok, "def f(", max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert isinstance(generate(model, tok, "x = ", max_new_tokens=4, temperature=0), str)
    with pytest.raises(UserError, match="no trained model"):
        load(tmp_path / "missing")
