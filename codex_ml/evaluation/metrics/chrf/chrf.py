"""chrF as an `evaluate` module, computed by sacrebleu so the numbers are sacrebleu's exactly.

Loaded by path (`evaluate.load("codex_ml/evaluation/metrics/chrf")`): the Hub script is unreachable
offline.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus chrF (sacrebleu defaults: char order 6, beta 2; word_order 2 gives chrF++), 0-100."
_KWARGS = """
predictions: list of str. references: list of str (one reference each).
char_order, word_order, beta: sacrebleu CHRF settings. per_sample: also return sentence scores.
Returns: chrf (0-100) and, with per_sample, scores (one sentence chrF per prediction).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Popovic, 2015 (chrF); Post, 2018 (sacrebleu)",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, per_sample=False):
        chrf = sacrebleu.CHRF(char_order=char_order, word_order=word_order, beta=beta)
        out = {"chrf": chrf.corpus_score(list(predictions), [list(references)]).score}
        if per_sample:
            out["scores"] = [chrf.sentence_score(p, [r]).score for p, r in zip(predictions, references)]
        return out
