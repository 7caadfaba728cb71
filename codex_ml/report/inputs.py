"""Read what the other stages wrote. Every reader returns None when its input is missing or
unreadable, so the report renders with "not available" there instead of failing."""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("codex.report")


@dataclass(frozen=True)
class Paths:
    ingest: Path = Path("metrics/ingest.json")
    sanitize: Path = Path("metrics/sanitize.json")
    split: Path = Path("metrics/split.json")
    manifest: Path = Path("data/splits/manifest.json")
    tokenizer: Path = Path("metrics/tokenizer.json")
    train: Path = Path("metrics/train.json")
    train_live: Path = Path("metrics/train")
    eval: Path = Path("metrics/eval.json")
    eval_dir: Path = Path("data/eval")
    eval_docs: Path = Path("metrics/eval_docs.json")  # per-document bits, committed: paired comparison
    provenance: Path = Path("models/model/provenance.json")


# The metric files compared against the last commit, by section name.
COMPARED = ("eval", "train", "tokenizer")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def read_jsonl(path: Path, limit: int | None = None) -> list[dict] | None:
    try:
        out = []
        with open(path) as f:
            for line in f:
                if limit is not None and len(out) >= limit:
                    break
                out.append(json.loads(line))
        return out
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return None


def read_docs(eval_dir: Path):
    """Per-document scores from evaluate (a pandas DataFrame), or None."""
    import pandas as pd

    try:
        return pd.read_parquet(Path(eval_dir) / "docs.parquet")
    except (FileNotFoundError, OSError, ValueError):
        return None


def read_curves(live_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """DVCLive step series: {"train/loss": [(step, value), ...], "eval/loss": ...}; system/* skipped."""
    import csv

    root = Path(live_dir) / "plots" / "metrics"
    curves = {}
    for f in sorted(root.rglob("*.tsv")) if root.is_dir() else []:
        name = f.relative_to(root).with_suffix("").as_posix()
        if name.startswith("system/"):
            continue
        try:
            with open(f, newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            col = f.stem if rows and f.stem in rows[0] else [c for c in rows[0] if c not in ("step", "timestamp")][0]
            curves[name] = [(float(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]
        except (OSError, ValueError, KeyError, IndexError) as e:
            log.warning("skipping %s: %s", f, e)
    return curves


def committed_json(path: Path, ref: str, repo: Path = Path(".")) -> dict | None:
    """The file's content at git `ref` (e.g. HEAD), or None (no git, no commit, file not there)."""
    try:
        r = subprocess.run(["git", "-C", str(repo), "show", f"{ref}:{Path(path).as_posix()}"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except ValueError:
        return None


def git_describe(repo: Path = Path(".")) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def gather(paths: Paths, compare_to: str, num_samples: int) -> dict:
    ctx = {name: read_json(getattr(paths, name)) for name in
           ("ingest", "sanitize", "split", "manifest", "tokenizer", "train", "eval", "provenance")}
    ctx["curves"] = read_curves(paths.train_live)
    ctx["samples"] = read_jsonl(paths.eval_dir / "predictions.jsonl", num_samples)
    ctx["docs"] = read_docs(paths.eval_dir)
    ctx["compare_to"] = compare_to
    ctx["committed"] = {name: committed_json(getattr(paths, name), compare_to) for name in COMPARED}
    ctx["eval_docs"] = read_json(paths.eval_docs)
    ctx["committed_docs"] = committed_json(paths.eval_docs, compare_to)
    ctx["commit"] = git_describe()
    ctx["paths"] = paths
    return ctx
