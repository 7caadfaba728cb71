"""The evaluate stage's work: score a causal LM on the test split, run baselines and completions."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import io
from ..params import Params
from ..stage import UserError
from . import completion, humaneval, infill
from .baselines import compressed_bits
from .bootstrap import mean_ci, ratio_ci
from .lm import Scorer, context_length

log = logging.getLogger("codex.evaluate")
LN2 = math.log(2)


def load_model(model_dir: str | Path, tokenizer_dir: str | Path | None = None):
    """A Hugging Face causal LM and its tokenizer from local directories (never the Hub)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists():
        raise UserError(f"{model_dir} is not a Hugging Face model directory (no config.json); "
                        "pass --model a directory saved with save_pretrained")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else model_dir
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # tokenizers raises bare Exceptions for damaged files: all are bad input
        raise UserError(f"cannot load a tokenizer from {tok_dir}: {str(e).splitlines()[0]}; "
                        "pass --tokenizer DIR") from None
    tok.model_max_length = 1 << 30  # we window long documents ourselves; silence the length warning
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                     dtype=torch.float32).to(device).eval()
    except Exception as e:  # truncated safetensors, garbage config.json, unknown architecture
        raise UserError(f"cannot load a causal LM from {model_dir}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"tokenizer in {tok_dir} has {len(tok)} tokens but the model's embedding has "
                        f"{model.get_input_embeddings().num_embeddings}: they do not belong together")
    return model, tok


def doc_scores(out_dir: Path) -> dict:
    """The per-item scores a later run is compared with, pairwise (report): each test document's
    bits and bytes (from docs.parquet) and each HumanEval problem's passed samples. Small enough
    to commit (metrics/eval_docs.json); data/eval itself is not in git."""
    docs = pq.read_table(Path(out_dir) / "docs.parquet", columns=["id", "bytes", "nll_bits"]).to_pydict()
    out = {"docs": {"id": [i[:16] for i in docs["id"]], "bytes": docs["bytes"],
                    "nll_bits": [round(b, 4) for b in docs["nll_bits"]]}}
    he = Path(out_dir) / "humaneval.jsonl"
    if he.exists():
        per: dict[str, list[int]] = {}
        for line in he.read_text().splitlines():
            r = json.loads(line)
            c = per.setdefault(r["problem"], [0, 0])
            c[0] += bool(r["passed"])
            c[1] += 1
        out["humaneval"] = per
    return out


def _ci(t) -> dict:
    return {"value": t[0], "ci_low": t[1], "ci_high": t[2]}


def evaluate_model(model, tok, splits_dir: str | Path, out_dir: Path, p: Params) -> dict:
    """Write docs.parquet and predictions.jsonl into out_dir; return the metrics for eval.json."""
    import torch

    e = p.eval
    torch.manual_seed(p.seed)
    ctx = context_length(model, e.context)
    stride = e.stride or max(1, ctx // 2)
    scorer = Scorer(model, tok, ctx, stride, e.batch_size)
    meta = {k: [] for k in ("id", "path", "bytes", "gzip_bits", "xz_bits")}
    prompts, rests, sources = [], [], []
    infill_docs: list[dict] = []  # the first eval.infill.num_docs documents with a line to hide
    t0 = time.perf_counter()
    t_zip = 0.0
    n = 0
    # Stream the split a few documents at a time; only per-document scalars are kept.
    for batch in io.iter_batches(splits_dir, "test", ["id", "path", "text"], batch_size=16):
        rows = batch.to_pylist()
        if e.max_docs is not None:
            rows = rows[: e.max_docs - n]
        rows = [r for r in rows if r["text"]]
        for r in rows:
            data = r["text"].encode("utf-8")
            tz = time.perf_counter()
            c = compressed_bits(data)
            t_zip += time.perf_counter() - tz
            for k, v in (("id", r["id"]), ("path", r["path"]), ("bytes", len(data)),
                         ("gzip_bits", c["gzip"]), ("xz_bits", c["xz"])):
                meta[k].append(v)
            if len(infill_docs) < e.infill.num_docs and infill.make_task(r["text"]):
                infill_docs.append({k: r[k] for k in ("id", "path", "text")})
            if len(prompts) < e.completion.num_prompts:
                split = completion.make_prompt(r["text"], e.completion.prompt_lines)
                if split:
                    prompts.append(split[0]); rests.append(split[1]); sources.append(r)
        scorer.add(r["text"] for r in rows)
        n += len(rows)
        if e.max_docs is not None and n >= e.max_docs:
            break
    s = scorer.finish()
    t_lm = time.perf_counter() - t0 - t_zip
    if n == 0:
        raise UserError(f"the test split in {splits_dir} has no non-empty documents to evaluate")

    nll = np.array(s.nll)
    tokens = np.array(s.tokens, dtype=np.float64)
    nbytes = np.array(meta["bytes"], dtype=np.float64)
    cis = ratio_ci(
        num={"loss": nll, "bits_per_byte": nll / LN2, "top1_accuracy": np.array(s.top1),
             "top5_accuracy": np.array(s.top5), "gzip": np.array(meta["gzip_bits"]),
             "xz": np.array(meta["xz_bits"]), "bytes_per_token": nbytes},
        den={"loss": tokens, "bits_per_byte": nbytes, "top1_accuracy": tokens, "top5_accuracy": tokens,
             "gzip": nbytes, "xz": nbytes, "bytes_per_token": tokens},
        resamples=e.bootstrap, seed=p.seed)

    t1 = time.perf_counter()
    preds = [completion.heal(x) for x in
             completion.generate(model, tok, prompts, e.completion.max_new_tokens, ctx)]
    refs = [completion.reference(tok, r, e.completion.max_new_tokens) for r in rests]
    comp, per = completion.score(preds, refs)
    if per:
        comp_ci = mean_ci({k: np.array([x[k] for x in per]) for k in
                           ("exact_match_line", "edit_similarity_line", "rougeL")}, e.bootstrap, p.seed)
        comp = {k: (_ci(comp_ci[k]) if k in comp_ci else v) for k, v in comp.items()}
    t_comp = time.perf_counter() - t1

    # Infilling: skipped (and said so) for a model not trained with FIM.
    infill_records, infill_section = infill.evaluate(model, tok, infill_docs, e.infill, ctx,
                                                     e.bootstrap, p.seed)
    if infill_records:
        with open(out_dir / "infill.jsonl", "w") as f:
            for r in infill_records:
                f.write(json.dumps(r) + "\n")

    # Generated code runs only in the sandbox (separate processes); none of it in this one.
    he_records, he = humaneval.evaluate(model, tok, e.humaneval, ctx, p.seed)
    if he_records:
        with open(out_dir / "humaneval.jsonl", "w") as f:
            for r in he_records:
                f.write(json.dumps(r) + "\n")

    pq.write_table(pa.table({
        **meta, "tokens": s.tokens, "nll_bits": (nll / LN2).tolist(), "top1": s.top1, "top5": s.top5,
        "bits_per_byte": (nll / LN2 / np.maximum(nbytes, 1)).tolist()}), out_dir / "docs.parquet")
    with open(out_dir / "predictions.jsonl", "w") as f:
        for src, prompt, pred, ref, sc in zip(sources, prompts, preds, refs, per):
            f.write(json.dumps({"id": src["id"], "path": src["path"], "prompt": prompt,
                                "prediction": pred, "reference": ref,
                                "next_line": ref.split("\n", 1)[0], "scores": sc}) + "\n")

    # The bar chart `dvc plots show` draws (template bar_horizontal, x: bits_per_byte, y: system).
    io.write_json(out_dir / "bits_per_byte.json", [
        {"system": name, "bits_per_byte": v[0], "ci_low": v[1], "ci_high": v[2]}
        for name, v in (("model", cis["bits_per_byte"]), ("gzip -9", cis["gzip"]), ("xz -9", cis["xz"]))])

    loss = cis["loss"]
    return {
        "docs": n, "bytes": int(nbytes.sum()), "tokens": int(tokens.sum()),
        "loss": _ci(loss), "perplexity": _ci(tuple(math.exp(v) for v in loss)),
        "bits_per_byte": _ci(cis["bits_per_byte"]),
        "top1_accuracy": _ci(cis["top1_accuracy"]), "top5_accuracy": _ci(cis["top5_accuracy"]),
        "bytes_per_token": cis["bytes_per_token"][0],
        "baselines": {"gzip_bits_per_byte": _ci(cis["gzip"]), "xz_bits_per_byte": _ci(cis["xz"])},
        "completion": {"samples": len(preds), **comp},
        "infill": infill_section,
        "humaneval": he,
        "setup": {"context": ctx, "stride": stride, "bootstrap": e.bootstrap,
                  "parameters": sum(x.numel() for x in model.parameters()), "vocab_size": len(tok)},
        "timing": {"lm_seconds": round(t_lm, 2), "baseline_seconds": round(t_zip, 2), "completion_seconds": round(t_comp, 2),
                   "tokens_per_second": round(float(tokens.sum()) / max(t_lm, 1e-9), 1)},
    }
