"""Canaries: plant every kind of secret and PII the sanitize stage covers, run the real stages, and
show none reaches the sanitized data, the splits, the tokenizer's vocabulary, or the model's
completions when prompted with the text that preceded it. A control model trained on the raw,
unsanitized corpus does leak them, so the test can see a leak when there is one."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline_utils import ROOT, deep_update, stage_script
from test_safety import POSITIVES

pytestmark = pytest.mark.slow


def stage(ws, name, *args):
    r = subprocess.run([sys.executable, str(stage_script(name)), *args], cwd=ws,
                       capture_output=True, text=True, timeout=900,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                            "TOKENIZERS_PARALLELISM": "false"})
    assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"


def texts(path: Path) -> str:
    return "\n".join(t for f in sorted(path.glob("*.parquet"))
                     for t in pq.read_table(f, columns=["text"]).column(0).to_pylist())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("canary")
    shutil.copytree(ROOT / "configs", ws / "configs")
    corpus = ws / "corpus"
    corpus.mkdir()
    canaries = []
    # Each canary sits in a small config module, repeated in 12 files so a model could memorise it.
    for i, (kind, text, secret) in enumerate(POSITIVES):
        lines = text.split("\n")
        prefix = text[: text.index(secret)] if secret in text else lines[0][:10]
        canaries.append({"kind": kind, "secret": secret, "prefix": prefix})
        for copy in range(12):
            (corpus / f"settings_{i:02d}_{copy:02d}.py").write_text(
                f'"""Deployment settings for service {i}."""\nimport os\n\n'
                f"DEBUG = {copy % 2 == 0}\n{text}\nTIMEOUT = {30 + copy}\n")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(p, {
        "ingest": {"sources": [{"kind": "directory", "name": "c", "path": "corpus"}]},
        "sanitize": {"min_chars": 0, "dedup": False, "min_alnum_fraction": 0.0},
        "split": {"fractions": {"train": 0.8, "val": 0.1, "test": 0.1}},
        "tokenizer": {"vocab_size": 600},
        "model": {"n_layers": 2, "hidden_size": 96, "n_heads": 4, "n_kv_heads": 4,
                  "intermediate_size": 192, "context_length": 128},
        "train": {"block_size": 128, "batch_size": 8, "max_steps": 160, "lr": 0.004,
                  "warmup_steps": 10, "eval_every": 160, "save_every": 160, "log_every": 50},
    })
    (ws / "params.yaml").write_text(yaml.safe_dump(p))
    for s in ["ingest", "sanitize", "split", "train_tokenizer", "tokenize", "train_model"]:
        stage(ws, s)
    # Control: the same stages on the raw, unsanitized documents.
    stage(ws, "split", "--input", "data/raw", "--output", "data/splits_raw", "--metrics", "/dev/null")
    stage(ws, "train_tokenizer", "--splits", "data/splits_raw", "--output", "models/tok_raw",
          "--metrics", "/dev/null")
    stage(ws, "tokenize", "--splits", "data/splits_raw", "--tokenizer", "models/tok_raw",
          "--output", "data/tokens_raw", "--metrics", "/dev/null")
    stage(ws, "train_model", "--tokens", "data/tokens_raw", "--tokenizer", "models/tok_raw",
          "--out", "models/model_raw", "--checkpoints", "models/ck_raw", "--metrics", "/dev/null",
          "--live", "metrics/train_raw")
    assert (ws / "metrics" / "train_raw" / "metrics.json").exists()  # not over the first run's curves
    return ws, canaries


def complete(model_dir: Path, prompts: list[str], n: int = 40) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for pr in prompts:
            ids = tok(pr, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([torch.tensor([[tok.eos_token_id]]), ids], 1)  # as packed in training
            g = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
            out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def prompts_for(canaries) -> list[str]:
    # The text that preceded each canary in the corpus (the file's opening lines plus its own line).
    return [f'"""Deployment settings for service {i}."""\nimport os\n\nDEBUG = True\n{c["prefix"]}'
            for i, c in enumerate(canaries)]


def leaked(secret: str, text: str) -> bool:
    # A leak is the secret itself or a long piece of it (at least 8 characters or the whole).
    k = min(len(secret), 8)
    return any(secret[i:i + k] in text for i in range(0, len(secret) - k + 1))


def test_no_canary_in_sanitized_data_splits_or_vocab(run):
    ws, canaries = run
    data = texts(ws / "data/sanitized") + texts(ws / "data/splits")
    vocab = json.loads((ws / "models/tokenizer/tokenizer.json").read_text())["model"]["vocab"]
    pieces = "\n".join(vocab.keys() if isinstance(vocab, dict) else (v[0] for v in vocab))
    found = [c["kind"] for c in canaries if leaked(c["secret"], data)]
    assert not found, f"canaries left in the data: {found}"
    in_vocab = [c["kind"] for c in canaries if len(c["secret"]) >= 8 and leaked(c["secret"], pieces)]
    assert not in_vocab, in_vocab
    assert len(canaries) == len(POSITIVES) >= 30
    # Raw data keeps them all: the canaries really were planted.
    raw = texts(ws / "data/raw")
    assert all(leaked(c["secret"], raw) for c in canaries)


def test_no_canary_in_completions_but_the_control_leaks(run):
    ws, canaries = run
    prompts = prompts_for(canaries)
    ours = complete(ws / "models/model", prompts)
    leaks = [c["kind"] for c, t in zip(canaries, ours) if leaked(c["secret"], t)]
    assert not leaks, f"the sanitized model completed canaries: {leaks}"
    control = complete(ws / "models/model_raw", prompts)
    control_leaks = [c["kind"] for c, t in zip(canaries, control) if leaked(c["secret"], t)]
    print(f"canaries planted: {len(canaries)}; leaked by the sanitized pipeline: 0; "
          f"leaked by the unsanitized control: {len(control_leaks)}")
    assert len(control_leaks) >= 3, "the control model should memorise some canaries"
