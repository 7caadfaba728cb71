"""Single-line infilling on the test split, as SantaCoder's FIM evaluation does it.

For each of the first `num_docs` test documents with a non-blank line, one such line is hidden,
drawn with a generator seeded by the document's text (the same line every run). The model gets
the text before it as prefix and the text after it (from the hidden line's own line break on) as
suffix in PSM form (tokenizer.psm_prompt; cut to the context, keeping the text next to the hole),
writes greedily until EOS, <fim_pad> or a line break, and the text before the first line break is
scored against the hidden line: exact match and edit similarity (the project's metric modules,
trailing whitespace ignored, as for completion), each with a bootstrap interval over documents.

Skipped, and said so, for a model that was not trained to infill: a tokenizer without the
sentinels, or a provenance.json of ours saying train.fim.rate was 0 (or predating FIM). A model
from elsewhere (no provenance.json) whose tokenizer has the four sentinels is evaluated.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..tokenizer import FIM_PAD, fim_ids, psm_prompt
from .bootstrap import mean_ci
from .completion import load_metric


def make_task(text: str) -> tuple[str, str, str] | None:
    """(prefix, hidden line without its line break, suffix), or None without a non-blank line."""
    lines = text.splitlines(keepends=True)
    cands = [k for k, line in enumerate(lines) if line.strip()]
    if not cands:
        return None
    k = random.Random(hashlib.sha256(b"infill\0" + text.encode()).digest()).choice(cands)
    body = lines[k].rstrip("\r\n")
    return "".join(lines[:k]), body, lines[k][len(body):] + "".join(lines[k + 1:])


def skip_reason(model, tok) -> str | None:
    """Why this model is not evaluated for infilling, or None when it is."""
    if fim_ids(tok) is None:
        return "the tokenizer has no FIM sentinels"
    prov = Path(getattr(model, "name_or_path", "") or ".") / "provenance.json"
    if prov.is_file():
        fim = json.loads(prov.read_text()).get("fim") or {}
        if not fim.get("rate"):
            return f"trained without FIM (train.fim.rate = {fim.get('rate', 'absent')} in {prov})"
    return None


class LineEnd(StoppingCriteria):
    """Per row: done once the last token holds a line break (the hidden line is complete)."""

    def __init__(self, tok):
        self.ids = torch.tensor([i for i in range(len(tok)) if any(c in tok.decode([i]) for c in "\r\n")])

    def __call__(self, input_ids, scores, **kw):
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


@torch.inference_mode()
def _generate(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16):
    stop_ids = [tok.eos_token_id, fim_ids(tok)[FIM_PAD]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    stop = StoppingCriteriaList([LineEnd(tok)])
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = prompts[i:i + batch_size]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
        gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, use_cache=True,
                             do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=stop_ids,
                             stopping_criteria=stop)
        out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def evaluate(model, tok, docs: list[dict], cfg, context: int, resamples: int, seed: int):
    """(per-sample records, the `infill` section of eval.json) for up to cfg.num_docs `docs`."""
    reason = "eval.infill.num_docs = 0" if not cfg.num_docs else skip_reason(model, tok)
    if reason:
        return [], {"enabled": False, "skipped": reason}
    t0 = time.perf_counter()
    tasks = [(d, t) for d in docs if (t := make_task(d["text"]))][: cfg.num_docs]
    if not tasks:
        return [], {"enabled": False, "skipped": "no test document has a non-blank line"}
    room = max(8, context - cfg.max_new_tokens)
    prompts = [psm_prompt(tok, pre, suf, room) for _, (pre, _, suf) in tasks]
    threads = torch.get_num_threads()
    if next(model.parameters()).device.type == "cpu":
        torch.set_num_threads(1)  # tiny decode steps: a second thread only adds sync (completion.py)
    try:
        preds = [g.splitlines()[0] if g.strip("\r\n") else "" for g in
                 _generate(model, tok, prompts, cfg.max_new_tokens)]
    finally:
        torch.set_num_threads(threads)
    refs = [mid for _, (_, mid, _) in tasks]
    kw = {"predictions": preds, "references": refs}
    em = load_metric("exact_match").compute(**kw)["scores"]
    es = load_metric("edit_similarity").compute(**kw, first_line=True)["scores"]
    ci = mean_ci({"exact_match": np.array(em, dtype=float), "edit_similarity": np.array(es, dtype=float)},
                 resamples, seed)
    records = [{"id": d["id"], "path": d["path"], "prefix_chars": len(pre), "suffix_chars": len(suf),
                "prompt_tokens": len(p), "hidden_line": mid, "prediction": pred,
                "exact_match": a, "edit_similarity": b}
               for (d, (pre, mid, suf)), p, pred, a, b in zip(tasks, prompts, preds, em, es)]
    section = {"enabled": True, "docs": len(tasks), "mode": "PSM, one hidden line",
               "max_new_tokens": cfg.max_new_tokens,
               **{k: {"value": v[0], "ci_low": v[1], "ci_high": v[2]} for k, v in ci.items()},
               "seconds": round(time.perf_counter() - t0, 2)}
    return records, section
