"""The documentation stays true to the repository: docs/params.md is what the schema generates,
and every relative link in README.md and docs/*.md names a file or folder that exists (and, for
a Markdown file, a heading that exists)."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(md: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", md.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _generator():
    spec = importlib.util.spec_from_file_location("gen_params_doc", ROOT / "tools" / "gen_params_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_params_doc_is_generated_from_the_current_schema():
    expected = _generator().render()
    actual = (ROOT / "docs" / "params.md").read_text()
    assert actual == expected, "docs/params.md is stale: run `make docs` and commit it"


def test_params_doc_lists_every_schema_key():
    from codex_ml.params import Params

    text = (ROOT / "docs" / "params.md").read_text()

    def keys(cls, prefix=""):
        for name, f in cls.model_fields.items():
            key = f"{prefix}{name}"
            sub = f.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                yield from keys(sub, key + ".")
            yield key

    missing = [k for k in keys(Params) if f"`{k}`" not in text]
    assert not missing


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        dest = doc.parent / path if path else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files or headings: {broken}"
