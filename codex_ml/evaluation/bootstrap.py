"""Percentile bootstrap confidence intervals over documents.

Documents, not tokens, are the unit of resampling: tokens inside a file are strongly correlated, so
a token-level bootstrap would give intervals far too narrow. Ratio statistics (bits per byte = total
bits / total bytes, accuracy = correct tokens / tokens) are recomputed as sum/sum inside each
resample; the mean of per-document ratios would weight a 10-line file like a 10,000-line one.
"""

from __future__ import annotations

import numpy as np


def ratio_ci(num: dict[str, np.ndarray], den: dict[str, np.ndarray], resamples: int, seed: int,
             level: float = 0.95, chunk: int = 200) -> dict[str, tuple[float, float, float]]:
    """{name: (point, low, high)} for sum(num[name]) / sum(den[name]) with per-document arrays.

    All statistics share the same resampled document sets (paired), so their intervals are
    comparable, and the draws depend only on `seed` and the number of documents. Resamples are
    drawn in chunks so memory stays at chunk x n_docs however many resamples are asked for.
    """
    names = list(num)
    n = len(next(iter(num.values()))) if names else 0
    out: dict[str, tuple[float, float, float]] = {}
    if n == 0:
        return {k: (float("nan"),) * 3 for k in names}
    num = {k: np.asarray(v, dtype=np.float64) for k, v in num.items()}
    den = {k: np.asarray(v, dtype=np.float64) for k, v in den.items()}
    rng = np.random.default_rng(seed)
    stats = {k: [] for k in names}
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        idx = rng.integers(0, n, size=(b, n))
        for k in names:
            with np.errstate(invalid="ignore", divide="ignore"):
                stats[k].append(num[k][idx].sum(1) / den[k][idx].sum(1))
        done += b
    alpha = (1 - level) / 2
    for k in names:
        s = np.concatenate(stats[k])
        s = s[np.isfinite(s)]
        point = float(num[k].sum() / den[k].sum()) if den[k].sum() else float("nan")
        lo, hi = (np.quantile(s, [alpha, 1 - alpha]) if len(s) else (np.nan, np.nan))
        out[k] = (point, float(lo), float(hi))
    return out


def mean_ci(values: dict[str, np.ndarray], resamples: int, seed: int, level: float = 0.95):
    """{name: (mean, low, high)}: a mean is the ratio sum(x) / sum(1)."""
    return ratio_ci(values, {k: np.ones(len(v)) for k, v in values.items()}, resamples, seed, level)


def paired_diff_ci(num_new: np.ndarray, num_old: np.ndarray, den: np.ndarray, resamples: int,
                   seed: int, level: float = 0.95) -> dict:
    """The difference sum(num_new)/sum(den) - sum(num_old)/sum(den) over the same documents, with
    a paired percentile bootstrap: each resample draws documents once for both runs, so what the
    documents share (a hard file is hard for both) cancels and the interval is far narrower than
    two separate ones. Also the bootstrap standard error and the smallest difference the set can
    detect: (z_0.975 + z_0.80) x SE = 2.80 SE (5% two-sided, 80% power)."""
    num_new, num_old, den = (np.asarray(x, dtype=np.float64) for x in (num_new, num_old, den))
    n = len(den)
    rng = np.random.default_rng(seed)
    diffs = []
    for done in range(0, resamples, 200):
        idx = rng.integers(0, n, size=(min(200, resamples - done), n))
        d = den[idx].sum(1)
        diffs.append((num_new[idx].sum(1) - num_old[idx].sum(1)) / d)
    diffs = np.concatenate(diffs)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    se = float(diffs.std(ddof=1))
    return {"diff": float((num_new.sum() - num_old.sum()) / den.sum()), "ci_low": float(lo),
            "ci_high": float(hi), "se": se, "min_detectable": 2.80 * se, "n": n}
