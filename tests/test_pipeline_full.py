"""End-to-end: all seven stages under real dvc commands in a throwaway git repository."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pipeline_utils import BIN, dvc, env, git, make_repo, ran_stages, set_params

pytestmark = pytest.mark.slow
ALL = ["ingest", "sanitize", "split", "train_tokenizer", "tokenize", "train_model", "evaluate",
       "report"]
DATA_OUTS = ["data/raw", "data/sanitized", "data/splits", "models/tokenizer"]


def lock_hashes(repo) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o.get("md5") for st in lock["stages"].values() for o in st.get("outs", [])}


def weights_hash(repo) -> str:
    return hashlib.sha256((repo / "models/model/model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("full"))
    out = dvc(repo, "repro").stdout
    assert ran_stages(out) == ALL
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first run")
    return repo


def test_outputs_metrics_and_plots(repo):
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert ev["bits_per_byte"]["value"] > 0
    assert (repo / "reports/report.html").stat().st_size > 10_000
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert "bits_per_byte" in json.dumps(shown) and "dataset_version" in json.dumps(shown)
    plots = dvc(repo, "plots", "show", "--json").stdout
    assert "loss.tsv" in plots and "bits_per_byte.json" in plots
    assert ran_stages(dvc(repo, "repro").stdout) == []  # a second repro runs nothing


def test_exp_run_reruns_only_training_and_after(repo):
    out = dvc(repo, "exp", "run", "-S", "train.lr=0.001", "-n", "lr-1e-3").stdout
    assert ran_stages(out) == ["train_model", "evaluate", "report"]
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    assert "lr-1e-3" in json.dumps(shown)
    diff = dvc(repo, "metrics", "diff", "--json").stdout
    assert diff.strip()


def test_tokenizer_param_reruns_tokenizer_and_after_only(repo):
    set_params(repo, {"tokenizer": {"vocab_size": 420}})
    assert ran_stages(dvc(repo, "repro").stdout) == ALL[3:]


def test_two_fresh_runs_are_identical(repo, tmp_path):
    """Same data, params and seed on CPU: identical dvc.lock hashes for data and tokenizer outputs
    and identical model weights."""
    git(repo, "checkout", "params.yaml")  # the committed first run's params (exp run changed lr)
    dvc(repo, "repro")
    other = make_repo(tmp_path)
    dvc(other, "repro", "train_model")
    a, b = lock_hashes(repo), lock_hashes(other)
    for path in DATA_OUTS:
        assert a[path] == b[path], path
    assert weights_hash(repo) == weights_hash(other)


def test_queued_experiments_complete(repo):
    """`dvc exp run --queue` + `dvc queue start -j 2`: each queued run works in a copy holding only
    what git and DVC track, so this passes only if every stage's inputs are tracked."""
    git(repo, "checkout", "params.yaml")
    names = ["q-0.002", "q-0.004"]
    for name in names:
        dvc(repo, "exp", "run", "--queue", "-S", f"train.lr={name[2:]}", "-n", name)
    try:
        check_queue(repo, names)
    finally:
        stop_workers(repo)


def check_queue(repo, names):
    import subprocess
    import time

    # The workers `queue start` leaves behind inherit its stdout and stderr: as pipes they kept
    # this call open until the last worker exited, and one may never exit (seen in CI: dvc's
    # monitor asked it to shut down while its task still ran, and it stayed idle after), so
    # its output goes to a file.
    with open(repo.parent / "queue-start.log", "w") as log:
        r = subprocess.run([str(BIN / "dvc"), "queue", "start", "-j", "2"], cwd=repo, env=env(),
                           stdout=log, stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, (repo.parent / "queue-start.log").read_text()[-3000:]
    # `dvc queue status` is no atomic snapshot: it lists running, then queued, then finished tasks,
    # so a task claimed or finished in between is missing or listed twice; with -j 2 both workers
    # claim at once and one listing can miss both. "No Running/Queued line" thus does not mean
    # done: wait until each name is listed as Success or Failed.
    deadline = time.time() + 600
    while True:
        status = dvc(repo, "queue", "status").stdout
        states: dict[str, str] = {}
        for line in status.splitlines():  # task, name, created, status
            f = line.split()
            if len(f) > 2 and f[1] in names and states.get(f[1]) != "Success":
                states[f[1]] = f[-1]
        if all(states.get(n) in ("Success", "Failed") for n in names) or time.time() > deadline:
            break
        time.sleep(3)
    if any(states.get(n) != "Success" for n in names):
        logs = [(f"dvc queue logs {n}", dvc(repo, "queue", "logs", n, check=False))
                for n in names if states.get(n) != "Success"]
        logs = [(what, r.stdout + r.stderr) for what, r in logs]
        logs += [(w.name, w.read_text())
                 for w in sorted((repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.out"))]
        detail = "".join(f"\n--- {what}:\n{text[-3000:]}" for what, text in logs)
        raise AssertionError(f"{states}\n{status}{detail}")
    shown = dvc(repo, "exp", "show", "--json").stdout
    for name in names:
        assert name in shown


def stop_workers(repo):
    """`dvc queue stop`, then end any worker that missed it (their pid files), so none outlives
    the test."""
    import os
    import signal
    import subprocess

    try:
        dvc(repo, "queue", "stop", check=False, timeout=60)
    except subprocess.TimeoutExpired:
        pass
    for f in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"):
        pid = f.read_text().strip()
        try:  # only if that pid is still a queue worker (pids get reused)
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGTERM)
        except (OSError, ValueError):
            pass
