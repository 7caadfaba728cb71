"""BLEU as an `evaluate` module, computed by sacrebleu so the numbers are sacrebleu's exactly.

The Hub's `bleu` script cannot be fetched offline, so the project ships this one and loads it by
path: `evaluate.load("codex_ml/evaluation/metrics/bleu")`.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU (sacrebleu, one reference per prediction), 0-100."
_KWARGS = """
predictions: list of str. references: list of str (one reference each).
tokenize: sacrebleu tokenizer name (default '13a'). lowercase: bool. smooth_method: 'exp' (default).
Returns: bleu (0-100), precisions, brevity_penalty, sys_len, ref_len.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Post, 2018 (sacrebleu)", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, tokenize="13a", lowercase=False, smooth_method="exp"):
        bleu = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method)
        s = bleu.corpus_score(list(predictions), [list(references)])
        return {"bleu": s.score, "precisions": s.precisions, "brevity_penalty": s.bp,
                "sys_len": s.sys_len, "ref_len": s.ref_len}
