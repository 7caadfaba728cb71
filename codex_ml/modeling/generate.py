"""Sample completions from a trained model directory (what `codex generate` runs)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..stage import UserError


def load(model_dir: str | Path):
    """(model, tokenizer) from a model directory written by train_model; UserError if missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(model_dir)
    if not (d / "config.json").exists() and not (d / "adapter_config.json").exists():
        raise UserError(f"no trained model in {d} (expected config.json there; run "
                        "`dvc repro train_model` or pass --model DIR)")
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d))
    return model.eval(), tok


def generate(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, suffix: str | None = None) -> str:
    """The completion only (prompt excluded). temperature 0 means greedy decoding. With `suffix`,
    the model infills: it writes what goes between `prompt` and `suffix` (a PSM prompt, see
    tokenizer.psm_prompt), stopping at EOS or <fim_pad>."""
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise UserError("generate: temperature must be >= 0, top-p in (0, 1], max new tokens >= 1")
    torch.manual_seed(seed)
    limit = getattr(model.config, "max_position_embeddings", None)
    room = max(1, limit - max_new_tokens) if limit else None
    stop = [tok.eos_token_id]
    if suffix is not None:
        from ..tokenizer import FIM_PAD, fim_ids, psm_prompt

        ids = torch.tensor([psm_prompt(tok, prompt, suffix, room)])
        stop.append(fim_ids(tok)[FIM_PAD])
    else:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:  # train_model packs each document after an EOS, not a BOS
            ids = torch.cat([torch.tensor([[tok.eos_token_id]]), ids], dim=1)
        if room:
            ids = ids[:, -room:]
    sample = temperature > 0
    with torch.no_grad():
        # use_cache: saved models say false (a training setting); generation needs the KV cache.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             use_cache=True,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
