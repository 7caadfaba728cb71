"""train_model's peak memory against the corpus size, this code against a baseline commit's.

    .venv/bin/python bench/bench_train_rss.py /tmp/bench_data/1gb/ws /tmp/bench_data/4gb/ws \
        [--baseline-commit 6f66413] [--steps 200]

Each argument is a workspace that bench/bench_data.py made (data/tokens and models/tokenizer of
one corpus size). For each, the train_model stage of the working tree's code and of the baseline
commit's runs on those shards with the default params (plus --steps, log_every 1), one after the
other, and its process tree's peak RSS is sampled every 0.1 s (bench_data.run_stage). Prints the
peak per size and code, and each code's growth from the smallest to the largest corpus.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_data import run_stage  # noqa: E402

CODE = ["codex_ml", "stages", "tools", "configs", "params.yaml", "requirements.lock"]


def code_of(commit: str | None, work: Path) -> Path:
    """The working tree's code (commit None) or a commit's, copied under `work`."""
    dest = work / f"code-{commit or 'worktree'}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if commit is None:
        for name in CODE:
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    else:
        tar = subprocess.run(["git", "archive", commit, *CODE], cwd=ROOT, check=True,
                             capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=tar, check=True)
    return dest


def workspace(code: Path, data: Path, dest: Path, steps: int) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(code, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for sub in ("data/tokens", "models/tokenizer"):
        (dest / sub).parent.mkdir(parents=True, exist_ok=True)
        (dest / sub).symlink_to((data / sub).resolve())
    p = yaml.safe_load((dest / "params.yaml").read_text())
    p["train"].update(max_steps=steps, log_every=1, eval_every=steps, save_every=steps)
    (dest / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspaces", nargs="+", type=Path)
    ap.add_argument("--baseline-commit", default="6f66413")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_train_rss"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/out/train_rss.json")
    a = ap.parse_args()
    codes = {"baseline": code_of(a.baseline_commit, a.work), "this": code_of(None, a.work)}
    rows = []
    for data in a.workspaces:
        tokens = json.loads((data / "data/tokens/manifest.json").read_text())
        n = sum(s["tokens"] for split in ("train",) for s in tokens["splits"][split]["shards"]) \
            if "splits" in tokens else None
        for label, code in codes.items():
            ws = workspace(code, data, a.work / f"{data.parent.name}-{label}", a.steps)
            r = run_stage(ws, "train_model")
            m = json.loads((ws / "metrics/train.json").read_text())
            rows.append(dict(data=str(data), code=label, train_tokens=n, steps=m["steps"], **r))
            print(f"{data.parent.name} {label:8s} peak RSS {r['peak_rss_mb']:,} MB, wall {r['wall_s']} s, "
                  f"first step {r['first_step_s']} s, {m['steps']} steps", flush=True)
    first, last = a.workspaces[0], a.workspaces[-1]
    for label in codes:
        lo = next(r for r in rows if r["data"] == str(first) and r["code"] == label)
        hi = next(r for r in rows if r["data"] == str(last) and r["code"] == label)
        print(f"{label}: peak RSS {lo['peak_rss_mb']:,} -> {hi['peak_rss_mb']:,} MB "
              f"({hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x) from {first.parent.name} to {last.parent.name}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "baseline_commit": a.baseline_commit,
                                 "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
