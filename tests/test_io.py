import os

import pytest

from codex_ml.io import ShardWriter, atomic_dir, read_table, shard_paths, write_json
from codex_ml.stage import UserError


def test_atomic_dir_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as t:
        (t / "f").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as t:
        (t / "f").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (out / "f").read_text() == "v1"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_recovers_after_sigkill(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as t:
        (t / "f").write_text("v1")
    # What a SIGKILL between the two renames leaves: the output moved aside, a temp dir abandoned.
    os.rename(out, tmp_path / ".out.old-99")
    (tmp_path / ".out.tmp-zz").mkdir()
    with atomic_dir(out) as t:
        assert (out / "f").read_text() == "v1"
        (t / "f").write_text("v2")
    assert (out / "f").read_text() == "v2" and os.listdir(tmp_path) == ["out"]


def test_write_json_is_atomic(tmp_path):
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n'
    assert os.listdir(tmp_path) == ["m.json"]


def test_shards_and_corrupt_parquet(tmp_path):
    w = ShardWriter(tmp_path, "docs", shard_bytes=10)
    for i in range(3):
        w.add({"id": str(i), "source": "s", "path": f"{i}.py", "lang": "python",
               "text": "x" * 20, "bytes": 20})
    files = w.close()
    assert [f.name for f in files] == [f"docs-0000{i}.parquet" for i in range(3)]
    assert shard_paths(tmp_path, "docs") == files
    assert read_table(tmp_path, "docs").num_rows == 3
    files[1].write_bytes(b"PAR1 not really parquet")
    with pytest.raises(UserError, match="corrupt Parquet file .*docs-00001.parquet"):
        read_table(tmp_path, "docs")
    with pytest.raises(UserError, match="no Parquet table 'nope'"):
        read_table(tmp_path, "nope")
