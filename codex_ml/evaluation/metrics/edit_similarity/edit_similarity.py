"""Edit similarity, 1 - Levenshtein(prediction, reference) / max(len), as an `evaluate` module.

The usual code-completion score next to exact match (CodeXGLUE, ReACC): partial credit for a line
that is almost right. Characters, not tokens, so it does not depend on any tokenizer.
"""

import datasets
import evaluate

_DESCRIPTION = "Mean character-level edit similarity, 0-1 (1 = identical)."
_KWARGS = """
predictions: list of str. references: list of str.
first_line: compare only the first lines (default False).
Returns: edit_similarity (mean) and scores (one per pair).
"""


def levenshtein(a, b):
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def similarity(a, b):
    return 1.0 if not a and not b else 1.0 - levenshtein(a, b) / max(len(a), len(b))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class EditSimilarity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Levenshtein, 1966", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, first_line=False):
        if first_line:
            predictions = [p.split("\n", 1)[0].rstrip() for p in predictions]
            references = [r.split("\n", 1)[0].rstrip() for r in references]
        scores = [similarity(p, r) for p, r in zip(predictions, references)]
        return {"edit_similarity": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
