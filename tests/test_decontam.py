"""Decontamination: planted HumanEval copies (exact, renamed, re-laid-out) are caught; the standard
library, which contains no benchmark, is not flagged."""

import builtins
import io
import keyword
import re
import sysconfig
import tokenize
from pathlib import Path

import pytest

from codex_ml.evaluation.humaneval import load_problems
from codex_ml.safety.decontam import Decontaminator, Match
from codex_ml.stage import UserError

TOO_SMALL = {"HumanEval/23"}  # strlen: fewer n-grams than MIN_NGRAMS even with its solution


@pytest.fixture(scope="module")
def dec():
    return Decontaminator(benchmarks=("humaneval",), ngram=8, threshold=0.8)


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def rename(text: str) -> str:
    """Rename every identifier of the code (not inside strings or comments, not attributes,
    keywords or builtins), as a refactoring tool would."""
    keep = set(keyword.kwlist) | set(dir(builtins)) | {"List", "Tuple", "Optional", "Any"}
    lines = text.splitlines(keepends=True)
    names, edits = {}, []
    for t in tokenize.generate_tokens(io.StringIO(text).readline):
        if t.type == tokenize.NAME and t.string not in keep and \
                not lines[t.start[0] - 1][:t.start[1]].rstrip().endswith("."):
            names.setdefault(t.string, f"renamed_{len(names)}")
            edits.append((t.start, t.end, names[t.string]))
    for (row, c0), (_, c1), new in sorted(edits, reverse=True):
        lines[row - 1] = lines[row - 1][:c0] + new + lines[row - 1][c1:]
    return "".join(lines)


def relayout(text: str) -> str:
    """Two-space indents, spaces around operators and commas, doubled blank lines."""
    text = re.sub(r"(?m)^((?:    )+)", lambda m: "  " * (len(m.group(1)) // 4), text)
    text = re.sub(r"[ \t]*([=,+<>])[ \t]*", r" \1 ", text)
    return text.replace("\n\n", "\n\n\n")


def planted(body: str) -> str:
    """A benchmark copy inside an ordinary file: a real module before it, code after it."""
    host = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    return host + "\n\n" + body + "\n\nif __name__ == '__main__':\n    main()\n"


def test_exact_copies_are_caught(dec, problems):
    missed = {p.task_id for p in problems if dec.match(planted(p.prompt + p.canonical_solution)) is None}
    assert missed <= TOO_SMALL
    m = dec.explain(planted(problems[0].prompt + problems[0].canonical_solution))
    assert m == Match("humaneval", "HumanEval/0:problem", 1.0)


def test_renamed_and_relaid_out_copies_are_caught(dec, problems):
    edited = [relayout(rename(p.prompt + p.canonical_solution)) for p in problems]
    assert "def has_close_elements" not in edited[0] and "  for renamed_" in edited[0]  # really edited
    missed = {p.task_id for p, t in zip(problems, edited) if dec.match(planted(t)) is None}
    assert missed <= TOO_SMALL
    # A prompt alone (the docstring an instruction dataset would copy), renamed: most are caught.
    prompts = sum(dec.match(planted(relayout(rename(p.prompt)))) is not None for p in problems)
    assert prompts >= 155


def test_unrelated_code_is_not_flagged(dec):
    """Zero false positives over the default corpus: the standard library's .py files with the
    ingest stage's default excludes (about 600 files, 11 MB)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
            "__pycache__")
    files = [f for f in sorted(root.rglob("*.py"))
             if not set(f.relative_to(root).parts[:-1]) & set(skip)
             and not f.relative_to(root).parts[0].startswith("config-")]
    assert len(files) > 400
    flagged = [(str(f), dec.explain(f.read_text(encoding="utf-8", errors="replace"))) for f in files]
    assert [x for x in flagged if x[1]] == []


def test_threshold_and_ngram_change_what_matches(dec, problems):
    p = problems[0]
    half = p.prompt  # the prompt without its solution: the problem item is only partly present
    assert dec.explain(planted(half)).item == "HumanEval/0:prompt"
    # A reworded sentence leaves 79% of the prompt's 8-grams: found at 0.7, not at 0.8 or 1.0.
    tweaked = planted(p.prompt.replace("closer to each other", "nearer one another"))
    assert dec.match(tweaked) is None and Decontaminator(threshold=1.0).match(tweaked) is None
    assert Decontaminator(threshold=0.7).explain(tweaked).item == "HumanEval/0:prompt"
    # Longer n-grams are broken by the same edit more often.
    assert Decontaminator(ngram=13, threshold=1e-9).explain(tweaked).fraction < 0.7885


def test_bad_settings_are_one_line_errors():
    with pytest.raises(UserError, match=r"allowed are \['humaneval'\]"):
        Decontaminator(benchmarks=("mbpp",))
    with pytest.raises(UserError, match="ngram = 2"):
        Decontaminator(ngram=2)
    with pytest.raises(UserError, match="threshold = 0"):
        Decontaminator(threshold=0)
