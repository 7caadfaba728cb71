"""Faults under real `dvc repro`: kill -9 at random points, concurrent runs, a clean recovery."""

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline_utils import BIN, dvc, env, make_repo, ran_stages

pytestmark = pytest.mark.slow


def cache_is_intact(repo: Path) -> int:
    """Every object in the DVC cache hashes to its own name: nothing half-written was cached."""
    n = 0
    for f in (repo / ".dvc/cache/files/md5").rglob("*"):
        if f.is_file():
            name = f.parent.name + f.name.removesuffix(".dir")
            assert hashlib.md5(f.read_bytes()).hexdigest() == name, f"corrupt cache object {f}"
            n += 1
    return n


def outputs_match_lock(repo: Path) -> None:
    st = dvc(repo, "status", "--json").stdout.strip()
    assert json.loads(st or "{}") == {}, f"dvc status not clean: {st}"


def test_kill9_at_random_points_then_rerun_completes(tmp_path):
    repo = make_repo(tmp_path)
    # How long a clean run takes bounds where the kills land.
    t0 = time.perf_counter()
    dvc(repo, "repro")
    full = time.perf_counter() - t0
    stages = dvc(repo, "stage", "list", "--name-only").stdout.split()
    rng = random.Random(1234)
    kills = 0
    for i in range(5):
        # Touch one stage's script: that stage and everything downstream of it reruns, and the
        # kill lands at a random moment inside that stretch of the pipeline.
        s = rng.choice(stages)
        script = repo / "stages" / f"{s}.py"
        script.write_text(script.read_text() + f"\n# round {i}\n")
        left = stages[stages.index(s):]
        p = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        time.sleep(rng.uniform(0.5, max(1.0, full * len(left) / len(stages))))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        assert cache_is_intact(repo) > 0
        # A rerun after the kill always completes and leaves dvc status truthful.
        dvc(repo, "repro")
        outputs_match_lock(repo)
        assert cache_is_intact(repo) > 0
        leftovers = [p.name for d in ("data", "models") if (repo / d).exists()
                     for p in (repo / d).iterdir() if ".tmp-" in p.name or ".old-" in p.name]
        assert not leftovers, leftovers
    assert kills >= 3, "most kills should land while the pipeline runs"
    print(f"kill -9 rounds: {kills} kills landed, every rerun recovered ({stages})")


def test_concurrent_repro_fails_fast_and_damages_nothing(tmp_path):
    repo = make_repo(tmp_path)
    p = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in p.stdout:  # wait until the first run is inside a stage, holding DVC's lock
        if line.startswith("Running stage"):
            break
    t0 = time.perf_counter()
    second = dvc(repo, "repro", check=False)
    assert second.returncode != 0
    assert "lock" in (second.stderr + second.stdout).lower()
    assert time.perf_counter() - t0 < 30
    rest = p.stdout.read()
    assert p.wait() == 0, rest
    outputs_match_lock(repo)
    assert ran_stages(dvc(repo, "repro").stdout) == []
