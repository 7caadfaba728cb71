"""ingest and split on small real inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from codex_ml import params
from codex_ml.data.ingest import ingest
from codex_ml.data.split import assign, split
from codex_ml.io import ShardWriter, iter_rows, read_table, sha256_text
from codex_ml.stage import UserError

ROOT = os.path.dirname(os.path.dirname(__file__))


def cfg(**kw):
    return params.Ingest.model_validate(kw)


def test_directory_source_skips_by_reason(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "good.py").write_text("def f():\n\treturn 1  \r\n")
    (src / "pkg" / "ünï cödé.py").write_text("x = '😀 مرحبا'\n")  # spaces and Unicode in the path
    (src / "bad_utf8.py").write_bytes(b"x = '\xff\xfe'\n")
    (src / "binary.py").write_bytes(b"abc\x00def")
    (src / "big.py").write_text("x = 1\n" * 1000)
    (src / "empty.py").write_text("   \n")
    (src / "notes.txt").write_text("not included")
    (src / "pkg" / "loop").symlink_to(src)  # a directory symlink back to the root
    (src / "dangling.py").symlink_to(src / "missing.py")
    c = cfg(sources=[{"kind": "directory", "name": "d", "path": str(src)}], max_file_bytes=1000)
    out = tmp_path / "out"
    out.mkdir()
    m = ingest(c, out)
    rows = {r["path"]: r for r in iter_rows(out, "docs")}
    assert set(rows) == {"pkg/good.py", "pkg/ünï cödé.py"}
    assert rows["pkg/good.py"]["text"] == "def f():\n\treturn 1  \r\n"  # bytes kept exactly
    assert rows["pkg/good.py"]["id"] == sha256_text(rows["pkg/good.py"]["text"])
    assert rows["pkg/good.py"]["lang"] == "python"
    assert rows["pkg/ünï cödé.py"]["bytes"] == len("x = '😀 مرحبا'\n".encode())
    assert m["skipped"]["invalid_utf8"] == 1
    assert m["skipped"]["binary"] == 1
    assert m["skipped"]["too_large"] == 1
    assert m["skipped"]["empty"] == 1
    assert m["skipped"]["symlink_loop"] == 1
    assert m["skipped"]["unreadable"] == 1
    assert m["documents"] == 2 and m["sources"]["d"]["documents"] == 2


def test_include_exclude_globs(tmp_path):
    for p in ["a/x.py", "a/tests/t.py", "b/y.py", "b/z.js"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text("print('hello world')\n")
    c = cfg(sources=[{"kind": "directory", "name": "d", "path": str(tmp_path),
                      "include": ["**/*.py", "*.js"], "exclude": ["**/tests/**"]}])
    out = tmp_path / "out"
    out.mkdir()
    ingest(c, out)
    assert sorted(r["path"] for r in iter_rows(out, "docs")) == ["a/x.py", "b/y.py", "b/z.js"]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_table_sources(tmp_path, kind):
    df = pd.DataFrame({"code": ["def a():\n    pass\n", "", "x = 1\n"],
                       "file": ["a.py", "b.py", "c.rs"]})
    path = tmp_path / f"t.{kind}"
    {"jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "csv": lambda: df.to_csv(path, index=False),
     "parquet": lambda: df.to_parquet(path)}[kind]()
    c = cfg(sources=[{"kind": kind, "name": "t", "path": str(path), "text_column": "code",
                      "path_column": "file"}])
    out = tmp_path / "out"
    out.mkdir()
    m = ingest(c, out)
    rows = list(iter_rows(out, "docs"))
    assert [(r["path"], r["lang"], r["text"]) for r in rows] == [
        ("a.py", "python", "def a():\n    pass\n"), ("c.rs", "rust", "x = 1\n")]
    assert m["skipped"]["empty"] == 1


def test_table_missing_column_and_missing_path(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"content": "x = 1"}\n')
    c = cfg(sources=[{"kind": "jsonl", "name": "t", "path": str(path), "text_column": "text"}])
    with pytest.raises(UserError, match="column 'text' not in .*columns: content"):
        ingest(c, tmp_path)
    c = cfg(sources=[{"kind": "directory", "name": "d", "path": str(tmp_path / "nope")}])
    with pytest.raises(UserError, match="path not found"):
        ingest(c, tmp_path)


def test_stdlib_source_is_the_default(tmp_path):
    c = params.Params().ingest
    out = tmp_path / "out"
    out.mkdir()
    m = ingest(c, out)
    assert m["documents"] > 300 and m["bytes"] > 5e6
    paths = [r["path"] for r in iter_rows(out, "docs", columns=["path"])]
    assert "json/decoder.py" in paths
    assert not any(p.startswith(("site-packages/", "test/")) or "/tests/" in p for p in paths)


def _docs(n, prefix="d"):
    return [{"id": sha256_text(f"{prefix}{i}"), "source": "s", "path": f"dir{i % 60}/f{i}.py",
             "lang": "python", "text": f"{prefix}{i}", "bytes": len(f"{prefix}{i}")} for i in range(n)]


def _write(tmp, docs, name="docs"):
    tmp.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(tmp, name)
    for d in docs:
        w.add(d)
    w.close()
    return tmp


def test_split_is_stable_when_documents_are_added(tmp_path):
    s = params.Split()
    a = split(_write(tmp_path / "a", _docs(400)), _mk(tmp_path / "oa"), s, 7, 1 << 20)
    b = split(_write(tmp_path / "b", _docs(400) + _docs(200, "new")), _mk(tmp_path / "ob"), s, 7,
              1 << 20)
    where_a = {r["id"]: n for n in ("train", "val", "test") for r in iter_rows(tmp_path / "oa", n)}
    where_b = {r["id"]: n for n in ("train", "val", "test") for r in iter_rows(tmp_path / "ob", n)}
    assert all(where_b[i] == n for i, n in where_a.items())
    assert a["dataset_version"] != b["dataset_version"]
    counts = {n: a["splits"][n]["documents"] for n in ("train", "val", "test")}
    assert 320 < counts["train"] < 400 and counts["val"] > 5 and counts["test"] > 5
    # same input, same params: identical manifest and bytes
    c = split(tmp_path / "a", _mk(tmp_path / "oc"), s, 7, 1 << 20)
    assert c == a
    # a different seed moves documents
    d = split(tmp_path / "a", _mk(tmp_path / "od"), s, 8, 1 << 20)
    assert d["dataset_version"] != a["dataset_version"]


def _mk(p):
    p.mkdir(parents=True)
    return p


def test_split_group_by_directory_keeps_directories_together(tmp_path):
    s = params.Split(group_by="directory")
    split(_write(tmp_path / "a", _docs(300)), _mk(tmp_path / "o"), s, 1, 1 << 20)
    where = {}
    for n in ("train", "val", "test"):
        for r in iter_rows(tmp_path / "o", n):
            where.setdefault(os.path.dirname(r["path"]), set()).add(n)
    assert all(len(v) == 1 for v in where.values())


def test_split_manifest_hashes_files(tmp_path):
    m = split(_write(tmp_path / "a", _docs(200)), _mk(tmp_path / "o"), params.Split(), 1, 1 << 20)
    from codex_ml.io import sha256_file
    for n in ("train", "val", "test"):
        for f, h in m["splits"][n]["files"].items():
            assert sha256_file(tmp_path / "o" / f) == h
        assert m["splits"][n]["documents"] == read_table(tmp_path / "o", n).num_rows


def test_empty_test_split_is_an_error(tmp_path):
    with pytest.raises(UserError, match="split '(val|test)' would be empty"):
        split(_write(tmp_path / "a", _docs(3)), _mk(tmp_path / "o"),
              params.Split(fractions={"train": 0.98, "val": 0.01, "test": 0.01}), 1, 1 << 20)


def test_assign_follows_fractions():
    s = params.Split(fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    got = [assign(str(i), 3, s) for i in range(4000)]
    assert abs(got.count("train") / 4000 - 0.5) < 0.03
    assert abs(got.count("val") / 4000 - 0.25) < 0.03


def _stage(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("bad,needle", [
    ("train: {lr: -1}\n", "train.lr = -1"),
    ("train: {lr: fast}\n", "train.lr = 'fast'"),
    ("tokenizer: {vocab: 10}\n", "unknown key 'tokenizer.vocab'"),
    ("split: {fractions: {train: 0.5, val: 0.1, test: 0.1}}\n", "must sum to 1"),
    ("seed: [1\n", "invalid YAML at line"),
    ("model: {lora: {enabled: true}}\n", "LoRA needs a pretrained base"),
    ("ingest: {sources: [{kind: directory, name: x, path: /nonexistent}]}\n", "path not found"),
])
def test_bad_params_exit_2_and_write_nothing(tmp_path, bad, needle):
    (tmp_path / "params.yaml").write_text(bad)
    r = _stage([os.path.join(ROOT, "stages", "ingest.py"), "--params", "params.yaml"], tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0], r.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()


def test_failed_stage_leaves_previous_output(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.py").write_text("print('hello there')\n")
    (tmp_path / "params.yaml").write_text(
        "ingest: {sources: [{kind: directory, name: c, path: corpus}]}\n")
    r = _stage([os.path.join(ROOT, "stages", "ingest.py")], tmp_path)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "data/raw/docs.parquet").read_bytes()
    metrics = json.loads((tmp_path / "metrics/ingest.json").read_text())
    assert metrics["documents"] == 1
    # Now every file is skipped: the stage fails and the earlier outputs stay as they were.
    (tmp_path / "corpus" / "a.py").write_bytes(b"\x00")
    r = _stage([os.path.join(ROOT, "stages", "ingest.py")], tmp_path)
    assert r.returncode == 2 and "no documents" in r.stderr
    assert (tmp_path / "data/raw/docs.parquet").read_bytes() == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["raw"]  # no temp dirs left


def test_split_reports_test_documents_with_a_near_duplicate_in_train(tmp_path):
    import sysconfig

    from codex_ml.data.split import assign

    s = params.Split()
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / f).read_text() for f in ("textwrap.py", "shlex.py", "glob.py", "fnmatch.py",
                                               "bisect.py", "heapq.py", "copy.py", "base64.py")]
    docs = [dict(id=sha256_text(t), source="s", path=f"{i}.py", lang="python", text=t,
                 bytes=len(t.encode())) for i, t in enumerate(texts)]
    in_train = [d for d in docs if assign(d["id"], 7, s) == "train"]
    # An edited copy of a train document (one line changed) that the hash sends to test.
    base = in_train[0]["text"]
    k = next(k for k in range(1000) if assign(sha256_text(base + f"# edit {k}\n"), 7, s) == "test")
    copy = base + f"# edit {k}\n"
    docs.append(dict(id=sha256_text(copy), source="s", path="copy.py", lang="python", text=copy,
                     bytes=len(copy.encode())))
    m = split(_write(tmp_path / "in", docs), _mk(tmp_path / "o"), s, 7, 1 << 20)
    lk = m["leakage"]
    assert lk["with_near_duplicate_in_train"] >= 1 and lk["threshold"] == 0.85
    assert lk["test_documents"] == m["splits"]["test"]["documents"]
    off = split(_write(tmp_path / "in2", docs), _mk(tmp_path / "o2"),
                params.Split(leakage={"enabled": False}), 7, 1 << 20)
    assert "leakage" not in off and off["dataset_version"] == m["dataset_version"]
