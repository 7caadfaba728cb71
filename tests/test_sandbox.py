"""The code-execution sandbox and HumanEval scoring: real hostile programs, a real sandbox, no mocks.

Each hostile completion is planted as the body of HumanEval/0 (has_close_elements) and scored by
the same path as the model's samples; the test then looks, from outside, for what it tried to do.
"""

import json
import math
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codex_ml.evaluation import humaneval, sandbox
from codex_ml.params import Params

ROOT = Path(__file__).resolve().parents[1]
FAST = sandbox.Limits(timeout_s=1.5)


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


def score_one(problem, completion: str, limits=FAST) -> dict:
    records, summary = humaneval.score([problem], [[completion]], limits)
    assert summary["pass@1"] == float(records[0]["passed"])
    return records[0]


def body(*lines: str) -> str:
    """A completion of the (stripped) prompt: a new line, then the function's body."""
    return "\n" + "".join(f"    {ln}\n" for ln in lines)


def namespaced_pids() -> set[int]:
    """Host processes that live in another pid namespace (a sandbox's, or a container's)."""
    mine = os.readlink("/proc/self/ns/pid")
    out = set()
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and os.readlink(f"/proc/{d}/ns/pid") != mine:
                out.add(int(d))
        except OSError:
            pass
    return out


# ------------------------------------------------------------------------------- pass@k
def test_pass_at_k_matches_hand_computed_values():
    assert humaneval.pass_at_k(10, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 10, 10) == 1.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(10, 3, 10) == 1.0                       # n - c < k
    assert humaneval.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)   # 1 - C(3,2)/C(5,2)
    assert humaneval.pass_at_k(20, 1, 10) == pytest.approx(0.5)         # 1 - C(19,10)/C(20,10)
    # The product form against exact binomials where those are huge.
    n, c, k = 200, 37, 10
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k),
                                                         rel=1e-12)
    with pytest.raises(ValueError):
        humaneval.pass_at_k(5, 1, 10)


def test_pass_at_ks_reports_only_k_up_to_the_samples():
    assert humaneval.pass_at_ks([1, 0], n=5) == {"pass@1": pytest.approx(0.1)}
    both = humaneval.pass_at_ks([10, 0, 1], n=10)
    assert both == {"pass@1": pytest.approx((1 + 0 + 0.1) / 3), "pass@10": pytest.approx(2 / 3)}


def test_params_validate_humaneval():
    with pytest.raises(Exception, match="greedy"):
        Params.model_validate({"eval": {"humaneval": {"temperature": 0, "num_samples": 10}}})
    with pytest.raises(Exception, match="less than or equal to 164"):
        Params.model_validate({"eval": {"humaneval": {"problems": 165}}})
    assert not Params().eval.humaneval.enabled  # running model output is opt-in


def test_truncate_at_stop_sequences():
    assert humaneval.truncate("\n    return 1\n\ndef g():\n    pass") == "\n    return 1\n"
    assert humaneval.truncate("\n    x = 1\n    # fine\n    return x\n#end") == \
        "\n    x = 1\n    # fine\n    return x"
    assert humaneval.truncate("\n    return 2\nif __name__") == "\n    return 2"


# --------------------------------------------------------------------------- correctness
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    # All 164 reference solutions (about 15 s on 2 cores): the sandbox's limits break no correct code.
    canon = humaneval.canonical_check(problems, sandbox.Limits(timeout_s=10))
    assert canon == {"pass@1": 1.0, "failed": []}
    # Wrong: each problem given the next problem's solution, and a body that returns nothing.
    sub = problems[:20]
    shifted = [[q.canonical_solution] for q in sub[1:] + sub[:1]]
    _, summary = humaneval.score(sub, shifted, FAST)
    assert summary["pass@1"] == 0.0
    _, summary = humaneval.score(sub, [[body("return None")] for _ in sub], FAST)
    assert summary["pass@1"] == 0.0 and set(summary["kinds"]) <= {"failed", "error"}


def test_generated_style_completion_passes_and_a_broken_one_fails(problems):
    p = problems[0]
    ok = "\n" + p.canonical_solution.rstrip() + "\n"  # as generated after the stripped prompt
    r = score_one(p, ok)
    assert (r["passed"], r["kind"]) == (True, "passed")
    assert score_one(p, body("return (")) ["kind"] == "syntax_error"
    r = score_one(p, body("return undefined_name"))
    assert (r["kind"], r["detail"]) == ("error", "NameError")


def test_exit_before_the_tests_is_not_a_pass(problems):
    r = score_one(problems[0], body("import os", "os._exit(0)"))
    assert (r["passed"], r["kind"]) == (False, "error")
    r = score_one(problems[0], body("raise SystemExit(0)"))
    assert (r["passed"], r["kind"], r["detail"]) == (False, "error", "SystemExit")


# ------------------------------------------------------------------------ hostile code
def test_endless_loop_is_stopped_by_the_limits(problems):
    t0 = time.monotonic()
    r = score_one(problems[0], body("while True:", "    pass"))
    assert not r["passed"] and r["kind"] in ("timeout", "cpu_limit")
    assert time.monotonic() - t0 < 5


def test_sleeping_forever_is_stopped_by_the_wall_clock(problems):
    r = score_one(problems[0], body("import time", "time.sleep(3600)"))
    assert (r["passed"], r["kind"]) == (False, "timeout")


def test_fork_bomb_is_contained_and_leaves_no_process(problems):
    before = namespaced_pids()
    bomb = body("import os", "while True:", "    try:", "        os.fork()", "    except OSError:",
                "        pass")
    # A sample beside the bomb that starts 5 processes of its own still passes: the process limit
    # counts per sample (its user namespace), not per uid across samples.
    beside = ("import subprocess\nfor _ in range(5):\n"
              "    assert subprocess.run(['/bin/true']).returncode == 0\n")
    with sandbox_pool() as run:
        fb, ok = run(humaneval.program(problems[0], bomb)), run(beside)
        fb, ok = fb.result(), ok.result()
    assert not fb.passed and fb.kind in ("timeout", "cpu_limit")
    assert ok.passed, ok.output
    time.sleep(0.2)
    assert namespaced_pids() <= before  # every forked process died with the namespace


def sandbox_pool():
    from concurrent.futures import ThreadPoolExecutor

    class Pool:
        def __enter__(self):
            self.ex = ThreadPoolExecutor(2)
            return lambda prog: self.ex.submit(sandbox.run, prog, FAST)

        def __exit__(self, *a):
            self.ex.shutdown()
    return Pool()


def test_memory_hog_gets_memory_error(problems):
    r = score_one(problems[0], body("x = bytearray(8 << 30)", "return bool(x)"))
    assert (r["passed"], r["kind"]) == (False, "memory_limit")
    # Filling the default 1 GiB takes ~1.5 s of page faults on this VM: more time than FAST gives.
    r = score_one(problems[0], body("x = []", "while True:", "    x.append(bytearray(64 << 20))"),
                  sandbox.Limits(timeout_s=6))
    assert (r["passed"], r["kind"]) == (False, "memory_limit")


def test_writes_outside_the_sandbox_tmp_never_land(problems, tmp_path):
    token = secrets.token_hex(6)
    in_repo, in_tmp, in_pytest = ROOT / f".pwned-{token}", Path(f"/tmp/pwned-{token}"), tmp_path / "x"
    for target in (in_repo, in_pytest):
        r = score_one(problems[0], body(f"open({str(target)!r}, 'w').write('pwned')", "return True"))
        assert (r["passed"], r["kind"]) == (False, "error") and not target.exists()
    # /tmp inside is a private tmpfs: the write succeeds there and vanishes with the sample.
    r = score_one(problems[0], body(f"open({str(in_tmp)!r}, 'w').write('pwned')", "return None"))
    assert r["kind"] == "failed" and not in_tmp.exists()
    # Appending to an existing file of the repository: read-only too.
    readme = (ROOT / "README.md").read_bytes()
    r = score_one(problems[0], body("open('" + str(ROOT / "README.md") + "', 'a').write('x')"))
    assert r["kind"] == "error" and (ROOT / "README.md").read_bytes() == readme


def test_os_system_cannot_delete_files(problems, tmp_path):
    # One victim in the repository, one in the interpreter's environment: a checkout under /tmp is
    # hidden by the sample's private /tmp, while the environment is always bound in (read-only).
    token = secrets.token_hex(6)
    victim, in_env = ROOT / f".sandbox-victim-{token}", Path(sys.prefix) / f".sandbox-victim-{token}"
    for v in (victim, in_env):
        v.write_text("keep me")
    (tmp_path / "keep").write_text("keep me too")
    try:
        cmd = f"rm -rf {victim} {in_env} {tmp_path} {ROOT / 'README.md'}"
        res = sandbox.run(f"import os\nprint('rm:', os.system({cmd!r}))\n", FAST)
        # The shell ran (rm reported the read-only file system) and deleted nothing.
        assert "Read-only file system" in res.output, res.output
        assert victim.exists() and in_env.exists() and (tmp_path / "keep").exists() \
            and (ROOT / "README.md").exists()
        r = score_one(problems[0], body(f"import os; os.system({cmd!r})", "return None"))
        assert r["kind"] == "failed" and victim.exists() and in_env.exists()
    finally:
        victim.unlink()
        in_env.unlink()


def test_no_socket_reaches_a_listener_on_localhost(problems):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    got, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                got.append(srv.accept())
            except socket.timeout:
                pass
    t = threading.Thread(target=accept)
    t.start()
    try:
        leak = body("import socket", f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                    "s.sendall(b'leak')", "return True")
        r = score_one(problems[0], leak)
        tcp = sandbox.run(humaneval.program(problems[0], leak), FAST)
        udp = sandbox.run("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                          f"s.sendto(b'leak', ('127.0.0.1', {port}))\n", FAST)
        # A check that the listener works: this process connects.
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        time.sleep(0.5)
    finally:
        done.set()
        t.join()
        srv.close()
    assert (r["passed"], r["kind"], r["detail"]) == (False, "error", "OSError")
    assert "Network is unreachable" in tcp.output and "Network is unreachable" in udp.output
    assert len(got) == 1  # only the test's own connection arrived


def test_secrets_in_the_environment_are_invisible(problems, monkeypatch):
    secret = secrets.token_hex(12)
    monkeypatch.setenv("CODEX_TEST_SECRET", secret)
    # Looks in its own environment and in every process's it can see; solves the problem only
    # when it found the secret, so a leak would score as passed.
    spy = body(
        "import os, glob",
        "seen = [os.environ.get('CODEX_TEST_SECRET', '')]",
        "for f in glob.glob('/proc/*/environ'):",
        "    try:",
        "        seen.append(open(f, 'rb').read().decode(errors='replace'))",
        "    except OSError:",
        "        pass",
        "print('SEEN', seen)",
        "if not seen[0] and not any('CODEX_TEST_SECRET' in s for s in seen[1:]):",
        "    return None",
        "return any(abs(a - b) < threshold for i, a in enumerate(numbers) "
        "for j, b in enumerate(numbers) if i != j)")
    r = score_one(problems[0], spy)
    assert (r["passed"], r["kind"]) == (False, "failed")
    res = sandbox.run(humaneval.program(problems[0], spy), FAST)
    assert secret not in res.output and "SEEN" in res.output
    env = sandbox.run("import os\nprint(sorted(os.environ))\n", FAST).output
    assert env.strip() == "['HOME', 'LANG', 'LC_ALL', 'PATH']"


def test_runs_unprivileged_and_outside_the_pipeline_process(problems):
    out = sandbox.run("import os\nprint(os.getpid(), os.getuid(), os.getcwd(), os.listdir('/proc'))\n",
                      FAST).output.split(" ", 3)
    assert out[0] == "1"                       # pid 1 of its own pid namespace
    assert int(out[1]) != 0                    # never root
    assert out[2] == "/tmp"                    # its fresh tmpfs
    assert str(os.getpid()) not in out[3]      # the pipeline's process is not even visible


def test_no_sandbox_means_refusal_with_one_line(tmp_path):
    """Without user namespaces for an unmapped uid (unshare --user without a map), the sandbox
    cannot be set up: check() refuses and the evaluate stage exits 2 before doing anything."""
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare is not installed")
    probe = ("from codex_ml.evaluation import sandbox\n"
             "try:\n    sandbox.check()\nexcept sandbox.SandboxUnavailable as e:\n"
             "    print('REFUSED', e)\nelse:\n    print('RAN')\n")
    r = subprocess.run(["unshare", "--user", sys.executable, "-c", probe], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    if "unshare failed" in r.stderr:
        pytest.skip(f"cannot build the no-namespace case here: {r.stderr.strip()}")
    assert r.stdout.startswith("REFUSED cannot sandbox generated code on this machine: "
                               "unshare(CLONE_NEWUSER)"), r.stdout + r.stderr
    assert r.stdout.count("\n") == 1
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  humaneval:\n    enabled: true\n")
    r = subprocess.run(["unshare", "--user", sys.executable, "stages/evaluate.py", "--params", str(params),
                        "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                        "--metrics", str(tmp_path / "m.json")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("error: cannot sandbox generated code") and \
        r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------- the evaluate stage
def test_evaluate_model_writes_humaneval_samples(tmp_path):
    from test_evaluation import build_tiny_model, stdlib_texts, write_split

    from codex_ml.evaluation.pipeline import evaluate_model, load_model

    model, tok = load_model(build_tiny_model(tmp_path / "m"))
    splits = write_split(tmp_path / "splits", stdlib_texts(3))
    he = {"enabled": True, "problems": 2, "num_samples": 3, "max_new_tokens": 12, "timeout_s": 2}
    p = Params.model_validate({"seed": 3, "eval": {"bootstrap": 20, "completion": {"num_prompts": 1},
                                                   "humaneval": he}})
    out = tmp_path / "out"
    out.mkdir()
    m = evaluate_model(model, tok, splits, out, p)["humaneval"]
    assert (m["enabled"], m["problems"], m["samples_per_problem"], m["samples"]) == (True, 2, 3, 6)
    assert "pass@1" in m and "pass@10" not in m            # 3 samples: no pass@10
    assert m["canonical"] == {"pass@1": 1.0, "failed": []}
    assert sum(m["kinds"].values()) == 6 and m["seconds"]["total"] > 0
    rows = [json.loads(x) for x in (out / "humaneval.jsonl").read_text().splitlines()]
    assert [(r["problem"], r["sample"]) for r in rows] == [
        (f"HumanEval/{i}", j) for i in range(2) for j in range(3)]
    assert all(set(r) >= {"completion", "passed", "kind", "detail"} for r in rows)
    assert m["pass@1"] == sum(r["passed"] for r in rows) / 6

    off = Params.model_validate({"seed": 3, "eval": {"bootstrap": 20, "completion": {"num_prompts": 1}}})
    out2 = tmp_path / "out2"
    out2.mkdir()
    assert evaluate_model(model, tok, splits, out2, off)["humaneval"] == {"enabled": False}
    assert not (out2 / "humaneval.jsonl").exists()
