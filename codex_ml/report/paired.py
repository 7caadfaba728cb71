"""Paired comparisons with the committed run: the same test documents (and HumanEval problems)
scored by both, so the question "is this run really better?" gets an interval, not a bare delta.

Inputs are metrics/eval_docs.json now and at `report.compare_to` (committed, cache: false; the
per-document data/eval/ is not in git). Documents are matched by id; where the two test sets
differ (another split or corpus) only the shared documents with unchanged byte counts are paired,
and the text says how many.
"""

from __future__ import annotations

import numpy as np

from ..evaluation.bootstrap import paired_diff_ci

RESAMPLES = 2000


def _verdict(r: dict, lower_is_better: bool) -> str:
    if r["ci_low"] <= 0 <= r["ci_high"]:
        return "no detectable difference"
    better = (r["diff"] < 0) == lower_is_better
    return "better" if better else "worse"


def bits_per_byte(new: dict | None, old: dict | None, seed: int) -> dict | None:
    """Paired difference now - committed in bits per byte over the shared test documents."""
    if not new or not old or "docs" not in new or "docs" not in old:
        return None
    o = {i: (b, n) for i, b, n in zip(old["docs"]["id"], old["docs"]["bytes"], old["docs"]["nll_bits"])}
    rows = [(n, o[i][1], b) for i, b, n in zip(new["docs"]["id"], new["docs"]["bytes"],
                                               new["docs"]["nll_bits"]) if i in o and o[i][0] == b]
    if len(rows) < 2:
        return {"n": len(rows), "of": len(new["docs"]["id"])}
    a = np.array(rows, dtype=np.float64)
    r = paired_diff_ci(a[:, 0], a[:, 1], a[:, 2], RESAMPLES, seed)
    return {**r, "of": len(new["docs"]["id"]), "verdict": _verdict(r, lower_is_better=True)}


def pass_at_1(new: dict | None, old: dict | None, seed: int) -> dict | None:
    """Paired difference in HumanEval pass@1 (passed / samples per problem) over shared problems."""
    a, b = (new or {}).get("humaneval"), (old or {}).get("humaneval")
    if not a or not b:
        return None
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return {"n": len(shared), "of": len(a)}
    # pass@1 = mean over problems of passed/samples: the ratio of sums with denominator 1 each
    r = paired_diff_ci(np.array([a[k][0] / a[k][1] for k in shared]),
                       np.array([b[k][0] / b[k][1] for k in shared]), np.ones(len(shared)),
                       RESAMPLES, seed)
    return {**r, "of": len(a), "verdict": _verdict(r, lower_is_better=False)}


def section(new: dict | None, old: dict | None, ref: str, seed: int) -> str:
    out = []
    for name, unit, r in (("bits per byte", "documents", bits_per_byte(new, old, seed)),
                          ("HumanEval pass@1", "problems", pass_at_1(new, old, seed))):
        if r is None:
            continue
        if "diff" not in r:
            out.append(f"- {name}: only {r['n']} of {r['of']} {unit} shared with `{ref}`: no "
                       "paired comparison.\n")
            continue
        shared = f" ({r['n']} of {r['of']} shared)" if r["n"] != r["of"] else ""
        out.append(f"- {name}: {r['verdict']}, difference now - `{ref}` {r['diff']:+.4f}, 95% CI "
                   f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] (paired bootstrap over {r['n']} "
                   f"{unit}{shared}); this set detects differences of about {r['min_detectable']:.4f} "
                   "or more (5% two-sided, 80% power).\n")
    if not out:
        return ("\nPaired comparison: not available (metrics/eval_docs.json missing now or at "
                f"`{ref}`).\n")
    return "\nPaired comparison over the same test items:\n\n" + "".join(out)
