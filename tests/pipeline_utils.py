"""Helpers for end-to-end tests: a throwaway git+DVC copy of this repo with a small params profile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Files a pipeline run needs; everything else (tests, bench, docs) stays out of the copy.
COPY = ["stages", "codex_ml", "configs", "dvc.yaml", "params.yaml", ".dvcignore", "requirements.lock"]

# A small profile: a slice of the stdlib, a tiny tokenizer and model, a few training steps.
SMALL = {
    "ingest": {"sources": [{"kind": "directory", "name": "small",
                            "path": "corpus", "include": ["**/*.py"]}]},
    "tokenizer": {"vocab_size": 400, "input_sentence_size": 0},
    "model": {"n_layers": 1, "hidden_size": 32, "n_heads": 2, "n_kv_heads": 2,
              "intermediate_size": 64, "context_length": 64},
    "train": {"block_size": 64, "batch_size": 4, "max_steps": 6, "warmup_steps": 1,
              "eval_every": 3, "save_every": 3, "eval_batches": 2, "log_every": 1},
    "eval": {"batch_size": 4, "bootstrap": 50, "max_docs": 8,
             "completion": {"num_prompts": 2, "prompt_lines": 4, "max_new_tokens": 8},
             "humaneval": {"enabled": False}},  # tests/test_sandbox.py runs it; a 64-token model can't
}

STDLIB_SLICE = ["json", "email", "http", "urllib", "concurrent", "logging", "importlib", "xml/dom"]


def stage_script(name: str) -> Path:
    """stages/<name>.py, but for tokenize (stages/tokenize.py would shadow the stdlib's tokenize)."""
    return ROOT / "stages" / f"{ {'tokenize': 'tokenize_splits'}.get(name, name)}.py"


def deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = deep_update(dict(d.get(k) or {}), v) if isinstance(v, dict) else v
    return d


def make_repo(tmp: Path, overrides: dict | None = None, corpus_dirs=STDLIB_SLICE) -> Path:
    """Copy the pipeline into tmp/repo, add a small corpus, write a small params.yaml, git commit."""
    import sysconfig

    repo = tmp / "repo"
    repo.mkdir()
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for d in corpus_dirs:
        shutil.copytree(stdlib / d, repo / "corpus" / d,
                        ignore=shutil.ignore_patterns("__pycache__", "test*"))
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(p, SMALL)
    deep_update(p, overrides or {})
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n")
    git(repo, "init", "-q")
    sh(repo, BIN / "dvc", "init", "-q")
    sh(repo, BIN / "dvc", "config", "core.autostage", "true")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "init")
    return repo


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e['PATH']}"  # so dvc's `python stages/x.py` uses this interpreter
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1",
             GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@t")
    return e


def sh(repo: Path, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=repo, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{args} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\n"
                             f"stderr:\n{r.stderr[-3000:]}")
    return r


def git(repo: Path, *args, **kw):
    return sh(repo, "git", *args, **kw)


def dvc(repo: Path, *args, **kw):
    return sh(repo, BIN / "dvc", *args, **kw)


def ran_stages(out: str) -> list[str]:
    """Stage names `dvc repro` actually executed (not the ones it skipped)."""
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


def set_params(repo: Path, overrides: dict) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    deep_update(p, overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
