"""Checkpoint policy: completion markers (kill -9 safe), fingerprints, best-k + latest retention.

The engine writes `checkpoint-<step>/` file by file, so a kill while saving leaves a partial
directory. After everything is written, `mark_complete` adds `codex_complete.json` (written
atomically) holding the fingerprint of params and data; only directories with that marker and a
matching fingerprint are ever resumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from .. import io

log = logging.getLogger("codex.checkpoints")
MARKER = "codex_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def fingerprint(**parts) -> str:
    """sha256 of the canonical JSON of everything that decides the trained weights."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def step_of(path: str | Path) -> int:
    return int(_STEP.match(Path(path).name).group(1))


def scan(out_dir: Path) -> list[tuple[Path, dict | None]]:
    """Checkpoint dirs, oldest first, each with its marker (None when incomplete)."""
    if not out_dir.is_dir():
        return []
    found = []
    for d in out_dir.iterdir():
        if d.is_dir() and _STEP.match(d.name):
            marker = None
            try:
                marker = json.loads((d / MARKER).read_text())
            except (OSError, ValueError):
                pass
            found.append((d, marker))
    return sorted(found, key=lambda x: step_of(x[0]))


def find_resumable(out_dir: Path, fp: str) -> Path | None:
    """Newest complete checkpoint made with the same fingerprint. Anything else in `out_dir`
    (partial saves, other params or data) is removed so it can never be resumed by mistake."""
    ckpts = scan(out_dir)
    good = [d for d, m in ckpts if m and m.get("fingerprint") == fp]
    for d, m in ckpts:
        if m is None:
            log.info("removing incomplete %s (interrupted while saving)", d)
            shutil.rmtree(d, ignore_errors=True)
        elif m.get("fingerprint") != fp:
            log.info("removing %s: made with other params or data (fingerprint %s..., now %s...)",
                     d, str(m.get("fingerprint"))[:12], fp[:12])
            shutil.rmtree(d, ignore_errors=True)
    if good:
        log.info("resuming from %s (step %d; params and data fingerprint match)",
                 good[-1], step_of(good[-1]))
        return good[-1]
    if ckpts:
        log.info("no matching complete checkpoint in %s: starting fresh", out_dir)
    return None


def mark_complete(d: Path, fp: str, step: int, val_loss: float | None) -> None:
    io.write_json(d / MARKER, {"fingerprint": fp, "step": step, "val_loss": val_loss})


def rotate(out_dir: Path, keep: int) -> None:
    """Keep the best `keep` complete checkpoints by val loss, plus the latest."""
    done = [(d, m) for d, m in scan(out_dir) if m]
    if not done:
        return
    latest = done[-1][0]
    ranked = sorted((d for d, m in done if m.get("val_loss") is not None),
                    key=lambda d: dict(done)[d]["val_loss"])
    kept = {latest, *ranked[:keep]}
    for d, _ in done:
        if d not in kept:
            shutil.rmtree(d, ignore_errors=True)
