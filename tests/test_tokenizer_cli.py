"""`codex tokenizer ...`: each command on a tokenizer trained from a small real corpus."""

import json
import subprocess
import sys

import pytest

from codex_ml import tokenizer as T
from codex_ml.cli import main

from test_tokenizer import ROOT_HINT, small_params, write_splits  # noqa: F401


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    splits = write_splits(d / "splits")
    T.train_dir(splits, d / "tokenizer", small_params())
    return d


def codex(capsysbinary, *argv):
    """Run `codex argv...` in-process; return (exit code, stdout bytes, stderr text)."""
    code = 0
    try:
        main(list(map(str, argv)))
    except SystemExit as e:
        code = e.code
    out, err = capsysbinary.readouterr()
    return code, out, err.decode()


def test_encode_decode_round_trip(tok, capsysbinary, tmp_path):
    text = "def f():\n\treturn '▁😀'  \r\n"
    (tmp_path / "in.py").write_bytes(text.encode())
    code, out, _ = codex(capsysbinary, "tokenizer", "encode", "--model", tok / "tokenizer",
                         "-f", tmp_path / "in.py")
    assert code == 0
    ids = out.decode().split()
    assert [int(i) for i in ids] == T.load_sp(tok / "tokenizer").encode(text)
    code, out, _ = codex(capsysbinary, "tokenizer", "decode", "--model", tok / "tokenizer", *ids)
    assert code == 0 and out == text.encode()          # exact bytes, no added newline
    code, out, _ = codex(capsysbinary, "tokenizer", "encode", "--model", tok / "tokenizer", "x\n",
                         "--pieces", "--json", "--bos", "--eos")
    sp = T.load_sp(tok / "tokenizer")
    assert json.loads(out) == ["<s>", *sp.encode("x\n", out_type=str), "</s>"]


def test_validate_and_stats(tok, capsysbinary):
    code, out, _ = codex(capsysbinary, "tokenizer", "validate", "--model", tok / "tokenizer",
                         "--splits", tok / "splits", "--split", "test")
    assert code == 0 and b"round-trip" in out
    code, out, _ = codex(capsysbinary, "tokenizer", "stats", "--model", tok / "tokenizer",
                         "--splits", tok / "splits", "--split", "val")
    s = json.loads(out)
    assert code == 0 and s["vocab_size"] == 800 and s["eos_id"] == 2 and s["bytes_per_token"] > 2


def test_validate_fails_on_a_broken_export(tok, capsysbinary, tmp_path):
    """An HF export that forgot the ▁ escape must be caught: exit status 1."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "spm.model").write_bytes((tok / "tokenizer/spm.model").read_bytes())
    (bad / "tokenizer_config.json").write_text((tok / "tokenizer/tokenizer_config.json").read_text())
    j = json.loads((tok / "tokenizer/tokenizer.json").read_text())
    j["normalizer"]["normalizers"] = j["normalizer"]["normalizers"][2:]
    (bad / "tokenizer.json").write_text(json.dumps(j))
    (tmp_path / "doc.py").write_text("bar = '▁▁▁'\n")
    code, _, err = codex(capsysbinary, "tokenizer", "validate", "--model", bad,
                         "-f", tmp_path / "doc.py")
    assert code == 1 and "hf-mismatch" in err


def test_train_command(tok, capsysbinary, tmp_path):
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 500\n")
    code, out, _ = codex(capsysbinary, "tokenizer", "train", "--params", tmp_path / "params.yaml",
                         "--splits", tok / "splits", "--output", tmp_path / "t",
                         "--metrics", tmp_path / "m.json")
    assert code == 0 and json.loads(out)["vocab_size"] == 500
    assert json.loads((tmp_path / "m.json").read_text())["roundtrip_exact"] == 1.0


def test_clear_errors(tok, capsysbinary, tmp_path):
    code, _, err = codex(capsysbinary, "tokenizer", "encode", "--model", tmp_path / "none", "x")
    assert code == 2 and err.startswith("error: no tokenizer model")
    (tmp_path / "spm.model").write_bytes(b"\x00garbage")
    code, _, err = codex(capsysbinary, "tokenizer", "encode", "--model", tmp_path, "x")
    assert code == 2 and "not a valid SentencePiece model" in err and len(err.splitlines()) == 1
    code, _, err = codex(capsysbinary, "tokenizer", "decode", "--model", tok / "tokenizer", "5", "abc")
    assert code == 2 and "integers" in err
    code, _, err = codex(capsysbinary, "tokenizer", "decode", "--model", tok / "tokenizer", "99999")
    assert code == 2 and "out of range" in err
    code, _, err = codex(capsysbinary, "tokenizer", "validate", "--model", tok / "tokenizer",
                         "-f", tmp_path / "nope")
    assert code == 2 and "no such file" in err


def test_console_entry_point(tok):
    """`python -m codex_ml.cli` is what the `codex` console script runs."""
    r = subprocess.run([sys.executable, "-m", "codex_ml.cli", "tokenizer", "encode", "--model",
                        str(tok / "tokenizer"), "--pieces", "--json", "x = 1\n"], capture_output=True, text=True,
                       cwd=ROOT_HINT)
    assert r.returncode == 0
    assert json.loads(r.stdout) == T.load_sp(tok / "tokenizer").encode("x = 1\n", out_type=str)
