"""Run untrusted Python (model-generated code) in a throwaway Linux sandbox, one process per sample.

Each program runs like this (stdlib only; no root needed, see below):

  pipeline ── Popen, cleared env, new session ──> bootstrap (`python -I -S -c _BOOT`)
     unshare(NEWNET | NEWNS | NEWPID [| NEWUSER when not root]); mounts made private
     fork ──> pid 1 of a new pid namespace:
        the whole mount tree made read-only (mount_setattr, recursive), a fresh /proc (only the
        sandbox's processes visible: no /proc/<pipeline>/environ), a fresh tmpfs on /tmp as cwd
        (size-capped; it vanishes with the namespace), the program written there;
        when root: groups cleared, uid/gid nobody (65534); a user namespace of its own;
        rlimits CPU, AS, NPROC, FSIZE, NOFILE, CORE; parent-death signal SIGKILL;
        execve(python -I runner) with a fixed 4-variable environment.
     the bootstrap waits on a pidfd with the wall-clock timeout, SIGKILLs pid 1 when it expires
     (the kernel then kills every process of the namespace, even ones that called setsid), reads
     the capped output from the tmpfs and prints one JSON line.

Why each part:
- New network namespace: only a loopback that is down, so no socket reaches 127.0.0.1 or beyond.
- Read-only tree + private /tmp: nothing outside the sandbox's tmpfs is writable, whoever owns it.
  As root the program also runs as nobody, so even a path that escaped the read-only bind would be
  guarded by file permissions. Unprivileged (user namespaces allowed), the read-only tree is what
  protects the user's own files, including the repository.
- PID namespace: a timeout kills every descendant; a process group alone does not (setsid escapes).
- A user namespace per sample: RLIMIT_NPROC counts processes per user and namespace (Linux >=
  5.14), so a fork bomb in one sample cannot eat the process quota of a sample running beside it,
  as it would if all ran as plain nobody.
- The pipeline never imports or execs the code; the bootstrap starts with an empty environment.

Where a step is not possible (not Linux, no namespaces: a container without CAP_SYS_ADMIN or
seccomp blocking unshare, user namespaces disabled, kernel < 5.12 without mount_setattr),
`check()` raises a one-line UserError naming the step that failed. There is no unsandboxed mode.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..stage import UserError

NOBODY = 65534
OUTPUT_BYTES = 8192  # the last bytes of a sample's output that are kept

# Outcome kinds, in the order of the checks in `_classify`.
KINDS = ("passed", "failed", "error", "syntax_error", "timeout", "cpu_limit", "memory_limit", "killed")

# Exit codes the runner uses; anything else is reported as an error with its status.
_RUNNER = r"""
import os, sys, traceback
_exit, _write, nonce = os._exit, os.write, sys.argv[1]


def why(e):
    try:
        traceback.print_exc()
        _write(2, ("codex-sandbox-error: %s\n" % type(e).__name__).encode())
    except BaseException:
        pass


code = 0
try:
    src = open("program.py", encoding="utf-8").read()
    exec(compile(src, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except AssertionError as e:
    code = 1; why(e)
except SyntaxError as e:
    code = 3; why(e)
except MemoryError as e:
    code = 4; why(e)
except BaseException as e:
    code = 2; why(e)
try:
    sys.stdout.flush(); sys.stderr.flush()
except BaseException:
    pass
if code == 0:
    _write(1, ("\n" + nonce + "\n").encode())
_exit(code)
"""

_BOOT = r"""
import ctypes, json, os, resource, select, signal, sys, time
cfg = json.loads(sys.stdin.read())
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
NEWNS, NEWUSER, NEWPID, NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 0x4000, 0x40000


def report(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()


def fail(step, err=None):
    err = ctypes.get_errno() if err is None else err
    report(setup_error="%s failed: %s" % (step, os.strerror(err)))
    os._exit(0)


def check(rc, step):
    if rc != 0:
        fail(step)


def write(path, text, step):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        fail(step, e.errno)


def own_userns(uid, gid, step):
    # A user namespace that maps only our own ids: its processes hold no privilege outside it.
    check(libc.unshare(NEWUSER), step)
    write("/proc/self/setgroups", "deny", step + " (setgroups)")
    write("/proc/self/uid_map", "%d %d 1" % (uid, uid), step + " (uid_map)")
    write("/proc/self/gid_map", "%d %d 1" % (gid, gid), step + " (gid_map)")


def expose(path):
    # The interpreter may live where nobody cannot reach (pyenv under /root, mode 700): cover the
    # first ancestor nobody cannot traverse with an empty read-only tmpfs, and bind the one
    # directory needed back at its own path, read-only. The rest of that ancestor stays hidden.
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        top = "/" + "/".join(parts[: i + 1])
        if not os.stat(top).st_mode & 0o001:
            break
    else:
        return
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    check(libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=0755"),
          "mount tmpfs on " + top)
    os.makedirs(path, exist_ok=True)
    check(libc.mount(("/proc/self/fd/%d" % fd).encode(), path.encode(), None, MS_BIND | MS_REC, None),
          "bind-mount " + path)
    for p in (path, top):
        check(libc.mount(None, p.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
              "remount read-only " + p)
    os.close(fd)


root = os.geteuid() == 0
uid, gid = os.getuid(), os.getgid()
if root:
    check(libc.unshare(NEWNET | NEWNS | NEWPID), "unshare(CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID)")
else:
    own_userns(uid, gid, "unshare(CLONE_NEWUSER) (unprivileged user namespaces)")
    check(libc.unshare(NEWNET | NEWNS | NEWPID), "unshare(CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID)")
check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
r, w = os.pipe()  # setup errors of pid 1 come back here
pid = os.fork()
if pid == 0:
    os.close(r)
    os.dup2(w, 1)
    try:
        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
        # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY}): the whole tree read-only.
        attr = MountAttr(1, 0, 0, 0)
        check(libc.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)),
              "mount_setattr(MOUNT_ATTR_RDONLY, AT_RECURSIVE) on / (Linux >= 5.12)")
        check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
              "mount proc on /proc")
        if root:
            for path in cfg["expose"]:
                expose(path)
        # An interpreter under /tmp (a checkout there, its venv) would vanish under the private
        # /tmp: held open first, bound back read-only at its own path inside it.
        under_tmp = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in cfg["expose"]
                     if p == "/tmp" or p.startswith("/tmp/")]
        opts = "size=%dk,nr_inodes=4096,mode=1777" % cfg["tmpfs_kb"]
        check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()),
              "mount tmpfs on /tmp")
        for path, fd in under_tmp:
            os.makedirs(path, mode=0o755, exist_ok=True)
            check(libc.mount(("/proc/self/fd/%d" % fd).encode(), path.encode(), None, MS_BIND | MS_REC,
                             None), "bind-mount " + path)
            check(libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None),
                  "remount read-only " + path)
            os.close(fd)
        os.chdir("/tmp")
        with open("program.py", "w", encoding="utf-8") as f:
            f.write(cfg["program"])
        out = os.open(".output", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        if root:
            os.setgroups([])
            os.setresgid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
            os.setresuid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
            libc.prctl(4, 1)  # PR_SET_DUMPABLE: a uid change made /proc/self root's; uid_map needs it ours
            own_userns(cfg["nobody"], cfg["nobody"], "unshare(CLONE_NEWUSER) as nobody")
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the bootstrap (set after setuid)
        for name, soft, hard in cfg["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0); os.dup2(out, 2); os.dup2(out, 1)
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        os.execve(cfg["python"], [cfg["python"], "-I", "-c", cfg["runner"], cfg["nonce"]], env)
    except OSError as e:
        os.write(w, (json.dumps({"setup_error": "sandbox pid 1: %s" % e}) + "\n").encode())
    os._exit(127)
os.close(w)
t0 = time.monotonic()
fd = os.pidfd_open(pid)
timed_out = not select.select([fd], [], [], cfg["timeout_s"])[0]
if timed_out:
    os.kill(pid, signal.SIGKILL)  # pid 1: the kernel kills the rest of the namespace
_, status, ru = os.wait4(pid, 0)
wall = time.monotonic() - t0
err = os.read(r, 65536).decode(errors="replace").strip()
if err:
    report(**json.loads(err.splitlines()[-1]))
    os._exit(0)
try:
    with open("/tmp/.output", "rb") as f:  # the tail: where the traceback and the marker are
        f.seek(max(0, os.fstat(f.fileno()).st_size - cfg["output_bytes"]))
        output = f.read().decode("utf-8", "replace")
except OSError:
    output = ""
report(exit=os.waitstatus_to_exitcode(status), timed_out=timed_out, wall_s=round(wall, 4),
       cpu_s=round(ru.ru_utime + ru.ru_stime, 4), maxrss_kb=ru.ru_maxrss, output=output)
"""


@dataclass(frozen=True)
class Limits:
    """Per-sample limits. cpu_s defaults to the wall-clock timeout (rounded up)."""
    timeout_s: float = 3.0       # wall clock, from the sandbox's fork to its end (incl. ~30 ms startup)
    cpu_s: int | None = None     # RLIMIT_CPU seconds (SIGXCPU at this, SIGKILL one second later)
    memory_mb: int = 1024        # RLIMIT_AS: address space, so a memory hog gets MemoryError
    processes: int = 16          # RLIMIT_NPROC, counted within the sample's own user namespace
    file_mb: int = 16            # RLIMIT_FSIZE: largest file the program may write
    tmpfs_mb: int = 32           # size of the sample's /tmp
    open_files: int = 256        # RLIMIT_NOFILE

    def rlimits(self) -> list[tuple[str, int, int]]:
        import math

        cpu = self.cpu_s or max(1, math.ceil(self.timeout_s))
        mb = 1 << 20
        return [("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", self.memory_mb * mb, self.memory_mb * mb),
                ("RLIMIT_NPROC", self.processes, self.processes),
                ("RLIMIT_FSIZE", self.file_mb * mb, self.file_mb * mb),
                ("RLIMIT_NOFILE", self.open_files, self.open_files), ("RLIMIT_CORE", 0, 0)]


@dataclass(frozen=True)
class Result:
    kind: str             # one of KINDS
    passed: bool
    detail: str           # e.g. the exception's type, the signal, "exit status 7"
    wall_s: float
    cpu_s: float
    output: str           # the last OUTPUT_BYTES bytes of the program's stdout and stderr


class SandboxUnavailable(UserError):
    """This machine cannot set up the sandbox; generated code is then not run at all."""


def run(program: str, limits: Limits = Limits()) -> Result:
    """Run one Python program in a fresh sandbox; its exit decides the result (0: passed)."""
    if not sys.platform.startswith("linux"):
        raise SandboxUnavailable(f"the code-execution sandbox needs Linux namespaces; this is {sys.platform}")
    nonce = "codex-sandbox-done-" + secrets.token_hex(8)
    cfg = {"program": program, "runner": _RUNNER, "nonce": nonce, "python": sys.executable,
           "timeout_s": limits.timeout_s, "limits": limits.rlimits(), "nobody": NOBODY,
           "tmpfs_kb": limits.tmpfs_mb * 1024, "output_bytes": OUTPUT_BYTES, "expose": _interpreter_dirs()}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _BOOT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd="/",
                            start_new_session=True, close_fds=True)
    try:
        # The bootstrap enforces the timeout itself; this is the backstop should it hang.
        out, err = proc.communicate(json.dumps(cfg).encode(), timeout=limits.timeout_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError("sandbox bootstrap did not finish 30 s after the sample's timeout") from None
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise SandboxUnavailable(f"the code-execution sandbox failed to start: {tail[0]}")
    rep = json.loads(lines[-1])
    if "setup_error" in rep:
        raise SandboxUnavailable(
            f"cannot sandbox generated code on this machine: {rep['setup_error']} (needs Linux with "
            "network, mount and pid namespaces: root, or unprivileged user namespaces enabled; "
            "in a container CAP_SYS_ADMIN and a seccomp profile that allows unshare and mount)")
    kind, detail = _classify(rep, nonce, limits)
    return Result(kind, kind == "passed", detail, round(time.perf_counter() - t0, 4), rep["cpu_s"],
                  rep["output"].replace("\n" + nonce + "\n", ""))


def _interpreter_dirs() -> list[str]:
    """Directories the sandboxed interpreter needs: the venv and the Python it was made from."""
    dirs = {os.path.dirname(os.path.realpath(sys.executable)), os.path.realpath(sys.prefix),
            os.path.realpath(sys.base_prefix)}
    return sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs))


def _classify(rep: dict, nonce: str, limits: Limits) -> tuple[str, str]:
    code = rep["exit"]
    if rep["timed_out"]:
        return "timeout", f"wall clock over {limits.timeout_s} s"
    if code in (-24, -9) and rep["cpu_s"] >= limits.rlimits()[0][1] - 0.05:  # SIGXCPU, or SIGKILL at the hard limit
        return "cpu_limit", f"CPU time over {limits.rlimits()[0][1]} s"
    if code < 0:
        import signal

        return "killed", signal.Signals(-code).name
    if code == 0:
        if nonce in rep["output"]:
            return "passed", ""
        return "error", "exited with status 0 before the tests finished"
    if code == 1:
        return "failed", "AssertionError"
    if code == 3:
        return "syntax_error", "SyntaxError"
    if code == 4:
        return "memory_limit", f"MemoryError (address space limit {limits.memory_mb} MiB)"
    if code == 2:
        name = [ln for ln in rep["output"].splitlines() if ln.startswith("codex-sandbox-error: ")]
        return "error", name[0].split(": ", 1)[1] if name else "exception"
    return "error", f"exit status {code}"


def run_many(programs: list[str], limits: Limits = Limits(), workers: int | None = None,
             progress=None) -> list[Result]:
    """Run each program in its own sandbox, `workers` at a time (default: the CPU count)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as ex:
        futures = [ex.submit(run, p, limits) for p in programs]
        results = []
        for i, f in enumerate(futures):
            results.append(f.result())
            if progress:
                progress(i + 1, len(programs))
    return results


_checked: str | None = None


def check() -> str:
    """Raise SandboxUnavailable (a UserError, one line) unless a sample can be sandboxed here;
    return a short description of the sandbox. Run once per process."""
    global _checked
    if _checked is None:
        r = run("import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', 9))\n"
                "except OSError as e:\n    assert e.errno == 101, e\nelse:\n    raise SystemExit(9)\n",
                Limits(timeout_s=10))
        if not r.passed:
            raise SandboxUnavailable(f"the code-execution sandbox's self-check failed ({r.kind}: "
                                     f"{r.detail}): {r.output.strip().splitlines()[-1:]}")
        who = "uid nobody" if os.geteuid() == 0 else f"uid {os.getuid()} in a user namespace"
        _checked = (f"network/mount/pid namespaces, read-only tree, private tmpfs /tmp, {who}, "
                    "rlimits CPU/AS/NPROC/FSIZE, cleared environment")
    return _checked
