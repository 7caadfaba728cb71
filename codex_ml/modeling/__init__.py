"""Build or load the causal LM that train_model trains: a scratch Llama-style model sized to the
tokenizer, or a pretrained one (local directory or hub id), optionally wrapped with LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..params import Lora, Model
from ..stage import UserError

log = logging.getLogger("codex.modeling")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers raises bare Exceptions for damaged files: all are bad input
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]} "
                        "(run train_tokenizer, or point model.base at a model directory)") from None
    if tok.eos_token_id is None:
        raise UserError(f"tokenizer at {path} has no eos token; documents are packed with EOS separators")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build_scratch(m: Model, tokenizer, block_size: int):
    """A Llama-style decoder sized to the tokenizer (vocab incl. added tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if block_size > m.context_length:
        raise UserError(f"train.block_size {block_size} exceeds model.context_length {m.context_length}")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
        max_position_embeddings=m.context_length, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0, use_cache=False,
    )
    return LlamaForCausalLM(cfg)


def load_pretrained(base: str, trust_remote_code: bool = False, dtype=None):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code,
                                                    dtype=dtype or torch.float32)
    except Exception as e:  # truncated safetensors, garbage config.json, unknown architecture
        raise UserError(f"model.base = {base!r}: cannot load a causal LM: {str(e).splitlines()[0]} "
                        "(a local model directory, or a hub id when a network is there)") from None


def build(m: Model, tokenizer, block_size: int):
    return build_scratch(m, tokenizer, block_size) if m.init == "scratch" else load_pretrained(
        m.base, m.trust_remote_code)


def linear_module_names(model) -> list[str]:
    """Short names (last path component) of the Linear/Conv1D layers LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
             if isinstance(mod, (torch.nn.Linear, Conv1D)) and n}
    return sorted(names)


def apply_lora(model, lora: Lora):
    """Wrap `model` with LoRA adapters; unknown target names are a UserError listing valid ones."""
    from peft import LoraConfig, get_peft_model

    valid = linear_module_names(model)
    bad = [t for t in lora.target_modules if t not in valid]
    if bad:
        raise UserError(f"model.lora.target_modules: {bad} not in the model; "
                        f"valid names: {', '.join(valid)}")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), bias=lora.bias, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    return model


def base_model(model):
    """The transformers model inside a PEFT wrapper; the model itself when there is none."""
    return getattr(model, "get_base_model", lambda: model)()


def merge(peft_model):
    """Fold the adapter into the base weights: a plain transformers model again."""
    return peft_model.merge_and_unload()


def count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
