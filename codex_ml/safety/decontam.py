"""Benchmark decontamination: find training documents that contain a benchmark's problems.

BigCode dropped StarCoderData files containing HumanEval/MBPP prompts or solutions. Here a
document matches when it holds at least `threshold` of the distinct n-grams of one benchmark item:
a problem's prompt, its canonical solution, or both together as one text (the usual leak: a copy
of the benchmark file). n-grams are over a normalised token stream, so light edits do not hide a
copy:
- whitespace and layout do not exist in it (re-indented, re-spaced, re-wrapped code matches);
- the words of strings and comments (docstrings: most of a prompt) are a separate stream, lower-cased;
- in code, an identifier becomes one placeholder unless it is a keyword, a builtin or an attribute
  (`.append`), so renamed variables, arguments and functions match too.
Items with fewer than MIN_NGRAMS n-grams (one-line solutions such as `return a + b`) are left out:
their normalised form is ordinary code, found all over any corpus.

What it catches and what it costs: bench/RESULTS_SANITIZE.md.

    from codex_ml.safety.decontam import Decontaminator
    d = Decontaminator(benchmarks=("humaneval",), ngram=8, threshold=0.8)
    d.match(text)          # "humaneval" or None
    d.explain(text)        # Match(benchmark, item, fraction) of the best item, or None
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..stage import UserError

BENCHMARKS = ("humaneval",)
MIN_NGRAMS = 15

_STRCOM = re.compile(r'''[rRbBuUfF]{0,2}(?:"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:\\.|[^"\\\n])*"'''
                     r"""|'(?:\\.|[^'\\\n])*')|\#[^\n]*""")
_CODE = re.compile(r"\.[ \t]*[A-Za-z_]\w*|[A-Za-z_]\w*|\d[\w.]*|[^\w\s]")
_WORD = re.compile(r"\w+")
_KEEP = frozenset(keyword.kwlist) | frozenset(dir(builtins))
_NAME, _UNSEEN = 1, 0          # placeholder ids: a renamable identifier / a token no item has
_SALT = {"prose": 0x9E3779B97F4A7C15, "code": 0xC2B2AE3D27D4EB4F}


@dataclass(frozen=True)
class Match:
    benchmark: str
    item: str          # e.g. "HumanEval/12:prompt"
    fraction: float    # of the item's n-grams found in the document


def _streams(text: str) -> tuple[list[str], list[str]]:
    prose = _WORD.findall(" ".join(_STRCOM.findall(text)).lower())
    code = _CODE.findall(_STRCOM.sub(" ", text))
    return prose, code


def _humaneval_items() -> list[tuple[str, str]]:
    from ..evaluation.humaneval import load_problems

    out = []
    for p in load_problems():
        out += [(f"{p.task_id}:problem", p.prompt + p.canonical_solution),
                (f"{p.task_id}:prompt", p.prompt), (f"{p.task_id}:solution", p.canonical_solution)]
    return out


_LOADERS = {"humaneval": _humaneval_items}


class Decontaminator:
    """An n-gram index over benchmark items; `match` says which benchmark a document contains."""

    def __init__(self, benchmarks=("humaneval",), ngram: int = 8, threshold: float = 0.8):
        unknown = [b for b in benchmarks if b not in _LOADERS]
        if unknown or not benchmarks:
            raise UserError(f"decontamination benchmarks {list(benchmarks)}: allowed are {list(BENCHMARKS)}")
        if not 4 <= ngram <= 64:
            raise UserError(f"decontamination ngram = {ngram}: must be between 4 and 64 tokens")
        if not 0 < threshold <= 1:
            raise UserError(f"decontamination threshold = {threshold}: must be in (0, 1], the "
                            "fraction of an item's n-grams a document must contain")
        self.ngram, self.threshold = ngram, threshold
        self.vocab = {"prose": {}, "code": {}}
        texts = [(b, name, text) for b in benchmarks for name, text in _LOADERS[b]()]
        for _, _, text in texts:  # every token an item has gets an id; first ids are placeholders
            prose, code = _streams(text)
            for w in prose:
                self.vocab["prose"].setdefault(w, len(self.vocab["prose"]) + 2)
            for t in code:
                if t not in _KEEP and (t[0].isalpha() or t[0] == "_"):
                    continue
                self.vocab["code"].setdefault(self._norm(t), len(self.vocab["code"]) + 2)
        self.items: list[tuple[str, str, int]] = []
        owners: dict[int, list[int]] = {}
        for b, name, text in texts:
            grams = self._grams(text)
            if len(grams) < MIN_NGRAMS:
                continue
            for g in grams.tolist():
                owners.setdefault(g, []).append(len(self.items))
            self.items.append((b, name, len(grams)))
        self.owners = owners
        self.table = np.array(sorted(owners), dtype=np.uint64)

    @staticmethod
    def _norm(t: str) -> str:
        return "." + t[1:].lstrip() if t[0] == "." else t

    def _grams(self, text: str) -> np.ndarray:
        """The distinct n-gram hashes of a text's two streams."""
        prose, code = _streams(text)
        pv, cv = self.vocab["prose"], self.vocab["code"]
        ids = {"prose": [pv.get(w, _UNSEEN) for w in prose],
               "code": [cv.get(t if t[0] != "." else self._norm(t), _NAME) if t[0].isalpha() or t[0] in "._"
                        else cv.get(t, _UNSEEN) for t in code]}
        out = []
        n = self.ngram
        for stream, seq in ids.items():
            if len(seq) < n:
                continue
            a = np.array(seq, dtype=np.uint64)
            h = np.full(len(a) - n + 1, _SALT[stream], dtype=np.uint64)
            with np.errstate(over="ignore"):  # a polynomial hash modulo 2**64
                for j in range(n):
                    h = h * np.uint64(1000003) + a[j:len(a) - n + 1 + j]
            out.append(h)
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.uint64)

    def explain(self, text: str) -> Match | None:
        """The item of which the document holds the largest fraction, when >= threshold."""
        h = self._grams(text)
        if not len(h) or not len(self.table):
            return None
        pos = np.minimum(np.searchsorted(self.table, h), len(self.table) - 1)
        hits = h[self.table[pos] == h]
        if not len(hits):
            return None  # the common case: one vectorised lookup
        counts = Counter(i for g in hits.tolist() for i in self.owners[g])
        best = max(counts, key=lambda i: (counts[i] / self.items[i][2], -i))
        frac = counts[best] / self.items[best][2]
        if frac < self.threshold:
            return None
        b, name, _ = self.items[best]
        return Match(b, name, round(frac, 4))

    def match(self, text: str) -> str | None:
        """The benchmark the document contains, or None."""
        m = self.explain(text)
        return m.benchmark if m else None
