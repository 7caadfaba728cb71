"""Disk full and read-only output directories: one clear error line, exit 2, nothing left behind.
Uses a tiny tmpfs (needs root and mount rights, as on CI's machine; skipped elsewhere)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def ingest(cwd, out):
    (cwd / "params.yaml").write_text("ingest: {max_file_bytes: 1000000}\n")  # the 11 MB stdlib
    return subprocess.run([sys.executable, str(ROOT / "stages/ingest.py"), "--output", str(out),
                           "--metrics", str(cwd / "m.json")], cwd=cwd, capture_output=True, text=True)


def errors(r):
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


def test_disk_full_is_one_line_exit_2_and_no_debris(tiny_fs, tmp_path):
    r = ingest(tmp_path, tiny_fs / "raw")
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors(r)) == 1 and "No space left on device" in errors(r)[0]
    assert "Traceback" not in r.stderr
    assert list(tiny_fs.iterdir()) == []  # the partial output was removed


def test_read_only_output_dir_is_one_line_exit_2(tiny_fs, tmp_path):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    r = ingest(tmp_path, tiny_fs / "raw")
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors(r)) == 1 and "Read-only file system" in errors(r)[0]
    assert "Traceback" not in r.stderr
