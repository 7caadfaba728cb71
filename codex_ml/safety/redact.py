"""The redaction engine: find every rule's matches in a document, resolve overlaps, replace spans."""

from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass

from .rules import Rule


@dataclass
class Result:
    text: str
    counts: Counter            # redactions per rule id
    blocked_by: str | None     # id of the first block rule that matched, if any


class Redactor:
    """Apply redact/block/allow rules to documents.

    Speed: a rule runs only when one of its keywords occurs in the document (a plain substring
    search; lowercased text for case-insensitive rules), so most rules cost a few `in` checks on a
    document without secrets. Rules listed first win overlaps (secrets before PII), then the
    earlier and longer match.
    """

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.block = [r for r in rules if r.action == "block"]
        self.allow = [r for r in rules if r.action == "allow"]
        self.redact = [r for r in rules if r.action == "redact"]
        self._ci = {r.id: bool(r.pattern.flags & re.IGNORECASE) for r in rules}
        self._kw = {r.id: tuple(k.lower() for k in r.keywords) if self._ci[r.id] else r.keywords
                    for r in rules}

    def _windows(self, rule: Rule, text: str, low: str, digit_lines) -> list[tuple[int, int]]:
        """The (start, end) ranges of `text` the rule must scan; [] when it cannot match."""
        full = [(0, len(text))]
        if rule.digits:
            return full if digit_lines is None else digit_lines
        kws = self._kw[rule.id]
        if not kws:
            return full
        hay = low if self._ci[rule.id] else text
        if not rule.line_scoped:
            return full if any(k in hay for k in kws) else []
        return _lines_holding(hay, kws)

    def _spans(self, rule: Rule, text: str, windows):
        vi = rule.pattern.groupindex.get("value")
        for ws, we in windows:
            for m in rule.pattern.finditer(text, ws, we):
                if rule.check is not None and not rule.check(m):
                    continue
                s, e = m.span(vi) if vi and m.start(vi) >= 0 else m.span()
                if e > s:
                    yield s, e

    def __call__(self, text: str) -> Result:
        low = text.lower()
        if len(low) != len(text):  # a few characters lowercase to two: keyword offsets would drift
            low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
        digit_lines = _digit_lines(text)
        for rule in self.block:
            if next(self._spans(rule, text, self._windows(rule, text, low, digit_lines)), None):
                return Result(text, Counter(), rule.id)
        starts: list[int] = []           # accepted spans, sorted by start, never overlapping
        spans: list[tuple[int, int, Rule]] = []
        for rule in self.allow + self.redact:  # allow spans go in first and shield what they cover
            for s, e in self._spans(rule, text, self._windows(rule, text, low, digit_lines)):
                i = bisect.bisect_right(starts, s)
                if (i and spans[i - 1][1] > s) or (i < len(spans) and spans[i][0] < e):
                    continue  # overlaps a span taken by an earlier rule
                starts.insert(i, s)
                spans.insert(i, (s, e, rule))
        counts: Counter = Counter()
        if not spans:
            return Result(text, counts, None)
        out, pos = [], 0
        for s, e, rule in spans:
            if rule.action == "allow":
                continue
            out.append(text[pos:s])
            out.append(rule.replacement)
            counts[rule.id] += 1
            pos = e
        out.append(text[pos:])
        return Result("".join(out), counts, None)


def _lines_holding(hay: str, keywords: tuple[str, ...]) -> list[tuple[int, int]]:
    """Sorted, merged (start, end) ranges of the lines of `hay` that contain any keyword."""
    found = []
    for k in keywords:
        i = hay.find(k)
        while i >= 0:
            s = hay.rfind("\n", 0, i) + 1
            e = hay.find("\n", i)
            e = len(hay) if e < 0 else e
            found.append((s, e))
            i = hay.find(k, e)
    return _merge(found)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    ranges.sort()
    out: list[tuple[int, int]] = []
    for s, e in ranges:
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


# Digits folded to "0": a phone number, IP, card or SSN needs 7+ characters of digits and
# separators, and on folded bytes the search skips ahead to each "0" at C speed.
_FOLD = bytes.maketrans(b"123456789", b"000000000")
_DIGIT_SHAPE = re.compile(rb"[0+][0 .()+-]{5,}0")


def _digit_lines(text: str) -> list[tuple[int, int]] | None:
    """Lines where PII digit rules can match; None (scan everything) for non-ASCII text, where
    byte offsets differ from character offsets."""
    if not text.isascii():
        return None
    folded = text.encode("ascii").translate(_FOLD)
    found = []
    for m in _DIGIT_SHAPE.finditer(folded):
        s = folded.rfind(b"\n", 0, m.start()) + 1
        e = folded.find(b"\n", m.end())
        found.append((s, len(folded) if e < 0 else e))
    return _merge(found)
