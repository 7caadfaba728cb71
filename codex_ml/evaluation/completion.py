"""Code completion: the model continues test files from a line inside them; we compare with the truth.

A prompt is a document's text up to the start of a non-blank line drawn from those after its
first `prompt_lines` lines (an empty "next line" would make exact match trivially easy), the draw
seeded by the document's text, so every run cuts it at the same place. Documents are taken in
split order, the first `num_prompts` that have such a line. The reference is the true
continuation cut to the same `max_new_tokens` tokens the model may generate, so long files do not
penalise BLEU/chrF for text the model was never allowed to write.

Scores (via the project's `evaluate` modules in metrics/): exact match and edit similarity of the
next line, BLEU, chrF and ROUGE-L of the whole continuation.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .lm import start_token_id

METRICS_DIR = Path(__file__).parent / "metrics"


def make_prompt(text: str, prompt_lines: int) -> tuple[str, str] | None:
    """Split a document into (prompt, rest) at a line boundary, or None when no non-blank line
    follows its first `prompt_lines` lines.

    The cut is drawn, not fixed: cutting every file after its first lines made a corpus whose
    files open with the same license header give the same prompt 32 times out of 32 (the GPU
    profile's site-packages, 2026-11-30). The prompt's final line break is left for the model
    to write: the tokenizer merges a newline with the next line's indentation ("\n    "), so a
    prompt that ends in a bare "\n" token is one the model never saw in training and derails
    it. `generate` makes the first token a line break and `heal` strips it again before scoring
    against `rest`."""
    lines = text.splitlines(keepends=True)
    cuts = [k for k in range(prompt_lines, len(lines)) if lines[k].strip()]
    if not cuts:
        return None
    k = random.Random(hashlib.sha256(text.encode()).digest()).choice(cuts)
    prompt = "".join(lines[:k])
    return prompt[: len(prompt) - len(_line_break(prompt))], "".join(lines[k:])


def _line_break(s: str) -> str:
    return "\r\n" if s.endswith("\r\n") else s[-1:] if s[-1:] in ("\n", "\r") else ""


def heal(prediction: str) -> str:
    """Drop the line break the prompt left off (see make_prompt)."""
    for nl in ("\r\n", "\n", "\r"):
        if prediction.startswith(nl):
            return prediction[len(nl):]
    return prediction


class LineBreakFirst(LogitsProcessor):
    """Only tokens that begin with a line break at the first generated position: a prompt ends
    where a line ended (make_prompt), which without its break the model cannot know; it would
    otherwise go on writing that line (seen: "#" continued as "# Unless required...")."""

    def __init__(self, tokenizer):
        self.width = 0  # the prompts' (padded) length: the batch's first generated position
        self.allowed = torch.tensor([i for i in range(len(tokenizer))
                                     if tokenizer.decode([i]).startswith(("\n", "\r"))])

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.width or not len(self.allowed):
            return scores
        keep = torch.full_like(scores, float("-inf"))
        keep[:, self.allowed.to(scores.device)] = 0
        return scores + keep


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, context: int,
             batch_size: int = 32) -> list[str]:
    """Greedy continuations, each starting with a line break. Prompts are left-padded, and cut
    from the left to fit the context."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    threads = torch.get_num_threads()
    if on_cpu:
        # A decode step is a few hundred tiny matmuls: a second thread only adds synchronisation
        # (measured 2x slower with 2 threads on the 2-core box, far worse when it is busy).
        torch.set_num_threads(1)
    try:
        return _generate(model, tokenizer, prompts, max_new_tokens, context, batch_size)
    finally:
        torch.set_num_threads(threads)


@torch.inference_mode()
def _generate(model, tokenizer, prompts, max_new_tokens, context, batch_size):
    start = start_token_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    keep = max(1, context - max_new_tokens)
    device = next(model.parameters()).device
    out = []
    first = LineBreakFirst(tokenizer)
    for i in range(0, len(prompts), batch_size):
        ids = [([start] + x)[-keep:]
               for x in tokenizer(prompts[i:i + batch_size], add_special_tokens=False)["input_ids"]]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
        first.width = width
        gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=True,
                             do_sample=False, num_beams=1, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id,
                             logits_processor=LogitsProcessorList([first]))
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def reference(tokenizer, rest: str, max_new_tokens: int) -> str:
    ids = tokenizer(rest[: max_new_tokens * 64], add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[:max_new_tokens], skip_special_tokens=True)


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def score(predictions: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """Corpus scores and one dict of per-sample scores per prediction."""
    if not predictions:
        return {}, []
    kw = {"predictions": predictions, "references": references}
    em = load_metric("exact_match").compute(**kw)
    es_line = load_metric("edit_similarity").compute(**kw, first_line=True)
    es = load_metric("edit_similarity").compute(**kw)
    bleu = load_metric("bleu").compute(**kw)
    chrf = load_metric("chrf").compute(**kw, per_sample=True)
    rouge = load_metric("rouge").compute(**kw)
    corpus = {"exact_match_line": em["exact_match"], "edit_similarity_line": es_line["edit_similarity"],
              "edit_similarity": es["edit_similarity"], "bleu": bleu["bleu"], "chrf": chrf["chrf"],
              "rougeL": rouge["rougeL"]}
    per = [{"exact_match_line": a, "edit_similarity_line": b, "edit_similarity": c, "chrf": d,
            "rougeL": e}
           for a, b, c, d, e in zip(em["scores"], es_line["scores"], es["scores"], chrf["scores"],
                                    rouge["scores"])]
    return corpus, per
