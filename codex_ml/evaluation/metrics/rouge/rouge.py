"""ROUGE-L (longest common subsequence F-measure) as an `evaluate` module, via rouge-score.

rouge-score's default tokenizer lowercases and drops every non-alphanumeric character, which
erases most of what matters in code; the default here keeps identifiers, numbers and each
punctuation mark as tokens (tokenizer="default" restores the rouge-score behaviour).
"""

import re

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "Mean ROUGE-L F-measure over prediction/reference pairs, 0-1."
_KWARGS = """
predictions: list of str. references: list of str (one reference each).
tokenizer: 'code' (default: identifiers, numbers and single punctuation marks) or 'default'.
Returns: rougeL (mean F-measure) and scores (one per pair).
"""
_CODE_TOKEN = re.compile(r"\w+|[^\w\s]")


class _CodeTokenizer:
    def tokenize(self, text):
        return _CODE_TOKEN.findall(text)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Lin, 2004", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, tokenizer="code"):
        scorer = rouge_scorer.RougeScorer(
            ["rougeL"], tokenizer=_CodeTokenizer() if tokenizer == "code" else None)
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rougeL": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
