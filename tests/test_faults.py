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
import yaml

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
    dvc(repo, "repro")
    stages = dvc(repo, "stage", "list", "--name-only").stdout.split()
    cmds = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    rng = random.Random(1234)
    kills = 0
    for i in range(5):
        # Touch one stage's script: that stage and everything downstream of it reruns, and the
        # kill lands at a random moment inside that stretch of the pipeline.
        s = rng.choice(stages)
        script = repo / cmds[s]["cmd"].split()[1]  # stages/<script>.py
        script.write_text(script.read_text() + f"\n# round {i}\n")
        log = tmp_path / f"round{i}.log"
        with open(log, "w") as out:
            p = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=repo, env=env(), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        # Into the rerun stretch: within 1.5 s of the touched stage's start (each stage of the
        # small profile takes longer, whatever the machine's load), at a random moment.
        deadline = time.time() + 120
        while p.poll() is None and f"Running stage '{s}'" not in log.read_text() \
                and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.1, 1.5))
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


def test_dvc_lock_writes_are_atomic_so_a_kill_mid_write_leaves_the_old_lock(tmp_path):
    """DVC 3.67 truncates dvc.lock, then writes it: a kill -9 in between left a lock the next
    `dvc repro` refused ("'./dvc.lock' validation failed", seen once in the kill rounds above).
    In this environment (tools/install.py's .pth, codex_ml.dvc_atomic) a dump that dies half-way
    leaves the old file whole and no temporary file. A fresh interpreter, like the `dvc` CLI's."""
    code = (
        "import os, sys\n"
        "from dvc.utils.serialize import _yaml, dump_yaml, load_yaml\n"
        "p = sys.argv[1]\n"
        "dump_yaml(p, {'schema': '2.0', 'stages': {'a': {'cmd': 'x'}}})\n"
        "def dies(data, fd, **kw):\n"
        "    fd.write('schema: 2.0\\nsta')\n"
        "    fd.flush()\n"
        "    raise SystemExit(9)\n"
        "try:\n"
        "    _yaml._dump_data(p, {'b': 2}, dumper=dies)\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(load_yaml(p), sorted(os.listdir(os.path.dirname(p))))\n")
    lock = tmp_path / "dvc.lock"
    (tmp_path / ".tmp-dvc.lock-999999999").write_text("left by a killed writer")
    out = subprocess.run([str(BIN / "python"), "-c", code, str(lock)], capture_output=True,
                         text=True, env=env(), check=True).stdout
    assert out.strip() == "{'schema': '2.0', 'stages': {'a': {'cmd': 'x'}}} ['dvc.lock']", out


def test_dvc_rwlock_writes_are_atomic_so_a_kill_mid_write_leaves_the_old_lock(tmp_path):
    """DVC truncates .dvc/tmp/rwlock, then dumps it: a kill -9 in between left an empty file that
    the next `dvc repro` refused ("Unable to read RWLock-file ... JSON structure is corrupted",
    seen in the kill rounds above). Here a dump dying half-way leaves the old lock whole."""
    code = (
        "import json, os, sys\n"
        "import dvc.rwlock as r\n"
        "from dvc.fs import LocalFileSystem\n"
        "d = sys.argv[1]\n"
        "with r._edit_rwlock(d, LocalFileSystem(), False) as lock:\n"
        "    lock['read']['x'] = [{'pid': 1, 'cmd': 'old'}]\n"
        "def dies(obj, fobj):\n"
        "    fobj.write('{\"read\": {')\n"
        "    fobj.flush()\n"
        "    raise SystemExit(9)\n"
        "r.json.dump = dies\n"
        "try:\n"
        "    with r._edit_rwlock(d, LocalFileSystem(), False) as lock:\n"
        "        lock['read']['y'] = []\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(json.load(open(os.path.join(d, 'rwlock'))), sort_keys=True),\n"
        "      sorted(os.listdir(d)))\n")
    out = subprocess.run([str(BIN / "python"), "-c", code, str(tmp_path)], capture_output=True,
                         text=True, env=env(), check=True).stdout
    assert out.strip() == ('{"read": {"x": [{"cmd": "old", "pid": 1}]}, "write": {}} '
                           "['rwlock', 'rwlock.lock']"), out
