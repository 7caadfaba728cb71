"""Exact match of the first line of a completion, as an `evaluate` module.

Code completion's line-level score: does the model's first generated line equal the true next line?
Trailing whitespace (and the newline itself) is ignored; indentation is not.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions whose first line equals the reference's first line, 0-1."
_KWARGS = """
predictions: list of str. references: list of str.
first_line: compare only the first line (default True); else the whole strings (rstripped).
Returns: exact_match (mean) and scores (0/1 per pair).
"""


def _head(text, first_line):
    return (text.split("\n", 1)[0] if first_line else text).rstrip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, first_line=True):
        scores = [float(_head(p, first_line) == _head(r, first_line))
                  for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
