"""Stage evaluate: score the trained model on the test split (bits/byte, accuracy, completions),
and HumanEval pass@k with the generated code run in a sandbox (eval.humaneval).

  python stages/evaluate.py                      # models/model -> data/eval/, metrics/eval.json
  python stages/evaluate.py --model DIR          # any local Hugging Face causal LM, same split
"""

import argparse
import logging
import sys
from pathlib import Path

# Replace (not prepend to) the script's own folder on sys.path: this file is named evaluate.py and
# would otherwise shadow the `evaluate` library that the metric modules are loaded with.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from codex_ml import io, params  # noqa: E402
from codex_ml.evaluation import sandbox  # noqa: E402
from codex_ml.evaluation.pipeline import doc_scores, evaluate_model, load_model  # noqa: E402
from codex_ml.stage import run  # noqa: E402

log = logging.getLogger("codex.evaluate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="models/model", help="Hugging Face causal LM directory")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--out", default="data/eval", help="per-document scores and predictions.jsonl")
    ap.add_argument("--metrics", default="metrics/eval.json")
    ap.add_argument("--doc-scores", default="metrics/eval_docs.json",
                    help="per-document bits (committed: the report's paired comparison)")
    a = ap.parse_args()
    p = params.load(a.params)
    if p.eval.humaneval.enabled:
        sandbox.check()  # no sandbox, no pass@k: refused before any work (exit 2)
    model, tok = load_model(a.model, a.tokenizer)
    with io.atomic_dir(a.out) as tmp:
        m = evaluate_model(model, tok, a.splits, tmp, p)
        io.write_json(tmp / "run.json", {"model": a.model, "tokenizer": a.tokenizer or a.model,
                                          "splits": a.splits})
    io.write_json(a.metrics, m)
    io.write_json(a.doc_scores, doc_scores(a.out))
    b, c = m["bits_per_byte"], m["completion"]
    log.info("evaluate: %d docs, %d tokens: bits/byte %.3f [%.3f, %.3f] (gzip %.3f, xz %.3f), "
             "top-1 %.3f, completion exact line %s -> %s", m["docs"], m["tokens"], b["value"],
             b["ci_low"], b["ci_high"], m["baselines"]["gzip_bits_per_byte"]["value"],
             m["baselines"]["xz_bits_per_byte"]["value"], m["top1_accuracy"]["value"],
             (c.get("exact_match_line") or {}).get("value", "n/a"), a.metrics)
    if m["humaneval"]["enabled"]:
        h = m["humaneval"]
        log.info("evaluate: HumanEval %d problems x %d: %s; canonical solutions pass@1 %.3f",
                 h["problems"], h["samples_per_problem"],
                 ", ".join(f"{k} {v:.3f}" for k, v in h.items() if k.startswith("pass@")),
                 h["canonical"]["pass@1"])


if __name__ == "__main__":
    run(main)
