"""A table of bad inputs, each run through the real stage script: exit status 2 with one clear line
(or the file skipped and counted, where that is the documented behaviour), earlier outputs intact."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline_utils import ROOT, SMALL, deep_update, stage_script

pytestmark = pytest.mark.slow
ORDER = ["ingest", "sanitize", "split", "train_tokenizer", "tokenize", "train_model", "evaluate"]


def stage(ws: Path, name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(stage_script(name)), *args], cwd=ws,
                          capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false",
                               "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": str(ws / "hidden")})  # hide_package's


def write_params(ws: Path, over: dict | None = None) -> None:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(p, SMALL)
    deep_update(p, {"eval": {"completion": {"num_prompts": 1}}})
    deep_update(p, over or {})
    (ws / "params.yaml").write_text(yaml.safe_dump(p))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A workspace where every stage has run once on a small corpus."""
    import sysconfig

    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(ROOT / "configs", ws / "configs")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for d in ["json", "email", "http", "urllib", "logging"]:
        shutil.copytree(stdlib / d, ws / "corpus" / d, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(ws)
    for s in ORDER:
        r = stage(ws, s)
        assert r.returncode == 0, f"{s}: {r.stderr[-2000:]}"
    return ws


def snapshot(ws: Path) -> dict:
    """Hashes of every output file, to prove a failed run changed nothing."""
    out = {}
    for d in ["data", "models", "metrics"]:
        for f in sorted((ws / d).rglob("*")):
            if f.is_file() and "checkpoints" not in f.parts:
                out[str(f.relative_to(ws))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 64}[how])


# (id, stage, setup(ws), expected message fragment)
CASES = [
    ("params-syntax", "split", lambda ws: (ws / "params.yaml").write_text("split: {fractions: [\n"),
     "invalid YAML"),
    ("params-unknown-key", "train_model", lambda ws: write_params(ws, {"train": {"lrate": 1}}),
     "unknown key 'train.lrate'"),
    ("params-wrong-type", "evaluate", lambda ws: write_params(ws, {"eval": {"bootstrap": "many"}}),
     "eval.bootstrap = 'many'"),
    ("params-out-of-range", "train_tokenizer",
     lambda ws: write_params(ws, {"tokenizer": {"vocab_size": 5}}), "tokenizer.vocab_size = 5"),
    ("params-lora-on-scratch", "train_model",
     lambda ws: write_params(ws, {"model": {"lora": {"enabled": True}}}), "LoRA needs a pretrained"),
    ("params-bf16-allreduce-under-fsdp", "train_model",
     lambda ws: write_params(ws, {"train": {"distributed": "fsdp", "ddp_allreduce": "bf16"}}),
     "applies to distributed: ddp"),
    ("params-fractions-sum", "split",
     lambda ws: write_params(ws, {"split": {"fractions": {"train": 0.9, "val": 0.2, "test": 0.1}}}),
     "must sum to 1"),
    ("corrupt-parquet-raw", "sanitize", lambda ws: corrupt(ws / "data/raw/docs.parquet", "garbage"),
     "corrupt Parquet"),
    ("truncated-parquet-splits", "train_tokenizer",
     lambda ws: corrupt(ws / "data/splits/train.parquet", "truncate"), "corrupt Parquet"),
    ("truncated-tokenizer", "train_model",
     lambda ws: corrupt(ws / "models/tokenizer/tokenizer.json", "truncate"), "tokenizer"),
    ("truncated-model", "evaluate",
     lambda ws: corrupt(ws / "models/model/model.safetensors", "truncate"), "models/model"),
    ("garbage-model-config", "evaluate",
     lambda ws: corrupt(ws / "models/model/config.json", "garbage"), "models/model"),
    ("empty-corpus", "ingest", lambda ws: (shutil.rmtree(ws / "corpus"), (ws / "corpus").mkdir()),
     "no documents"),
    ("missing-corpus", "ingest", lambda ws: shutil.rmtree(ws / "corpus"), "path not found"),
    ("sanitize-empties-corpus", "sanitize",
     lambda ws: write_params(ws, {"sanitize": {"min_chars": 10**9}}), "kept no documents"),
    ("empty-test-split", "split",
     lambda ws: write_params(ws, {"split": {"fractions": {"train": 0.999, "val": 0.0005,
                                                           "test": 0.0005}}}), "would be empty"),
    ("missing-policy-file", "sanitize",
     lambda ws: write_params(ws, {"sanitize": {"policy": "configs/nope.yaml"}}), "policy file"),
    ("missing-tokens", "train_model", lambda ws: shutil.rmtree(ws / "data/tokens"),
     "data/tokens/manifest.json not found"),
    ("missing-splits", "tokenize", lambda ws: shutil.rmtree(ws / "data/splits"), "data/splits"),
    ("tokens-of-another-tokenizer", "train_model",
     lambda ws: (ws / "models/tokenizer/tokenizer_config.json").write_text(
         (ws / "models/tokenizer/tokenizer_config.json").read_text() + " "),
     "made with another tokenizer"),
    ("fused-loss-with-lora-on-lm-head", "train_model",
     lambda ws: write_params(ws, {"model": {"init": "pretrained", "base": "models/model", "lora": {
         "enabled": True, "target_modules": ["q_proj", "lm_head"]}}, "train": {"engine": {"loss": "fused"}}}),
     "train.engine.loss = fused: its lm_head is not a plain Linear"),
    ("lever-that-cannot-apply", "train_model",
     lambda ws: write_params(ws, {"train": {"precision": "fp32", "engine": {"bf16_weights": "on"}}}),
     "train.engine.bf16_weights = on: train.precision is fp32, not bf16"),
    ("tracker-package-missing", "train_model",
     lambda ws: write_params(ws, {"train": {"report_to": ["mlflow"]}}) or hide_package(ws, "mlflow"),
     "train.report_to: mlflow needs the mlflow package"),
    ("batch-larger-than-data", "train_model",
     lambda ws: write_params(ws, {"train": {"batch_size": 10**6}}), "fewer than one step needs"),
]


def hide_package(ws: Path, name: str) -> None:
    """`name` unimportable for the stage (a package of that name that fails, first on its path):
    the stage's check must name it, installed here or not."""
    (ws / "hidden" / name).mkdir(parents=True)
    (ws / "hidden" / name / "__init__.py").write_text(f"raise ImportError('no {name} here')\n")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(base, tmp_path, case):
    _, name, setup, needle = case
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    setup(ws)
    before = snapshot(ws)
    r = stage(ws, name)
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert len(err) == 1 and needle in err[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert snapshot(ws) == before  # earlier outputs intact, nothing half-written


@pytest.mark.parametrize("kind", ["huge-line", "non-utf8", "binary", "unicode-path"])
def test_odd_files_are_skipped_and_counted_or_kept(base, tmp_path, kind):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    target = ws / "corpus" / "odd"
    target.mkdir()
    if kind == "huge-line":
        (target / "min.py").write_text("x=[" + "1," * 400_000 + "]\n")  # 800 KB on one line
    elif kind == "non-utf8":
        (target / "latin1.py").write_bytes("s = 'café'\n".encode("latin-1"))
    elif kind == "binary":
        (target / "blob.py").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    else:
        (target / "dir with spaces").mkdir()
        (target / "dir with spaces" / "ünïcode ✓.py").write_text("def ok():\n    return 'fine'\n" * 3)
    for s in ["ingest", "sanitize"]:
        r = stage(ws, s)
        assert r.returncode == 0, r.stderr[-2000:]
    ing = yaml.safe_load((ws / "metrics/ingest.json").read_text())
    san = yaml.safe_load((ws / "metrics/sanitize.json").read_text())
    if kind == "huge-line":
        assert san["dropped"]["long_line"] >= 1
    elif kind == "non-utf8":
        assert ing["skipped"]["invalid_utf8"] == 1
    elif kind == "binary":
        assert ing["skipped"]["binary"] == 1
    else:
        import pyarrow.parquet as pq
        paths = pq.read_table(ws / "data/sanitized/docs.parquet", columns=["path"]).column(0)
        assert "odd/dir with spaces/ünïcode ✓.py" in paths.to_pylist()
