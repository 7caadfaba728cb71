"""Install the locked dependencies into the running interpreter's environment (used by `make setup`).

requirements.lock pins `torch==2.13.0` with hashes of both PyPI's CUDA wheels and this kind of
machine's local CPU wheel. In hash-checking mode pip prefers index links that carry a matching hash
over a local file, so when the local CPU wheel is there we install it first from that folder alone;
the main install then finds torch already satisfied. The GPU-only libraries follow only when the
torch that got installed is a CUDA build.
"""

import glob
import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import tempfile

LOCAL_WHEELS = os.environ.get("CODEX_LOCAL_WHEELS", "/opt/wheels")
PIP = [sys.executable, "-m", "pip", "install", "-qq", "--require-hashes", "--no-deps"]


def torch_block(lock: str) -> str:
    m = re.search(r"^torch==.*?(?=^\S|\Z)", lock, re.M | re.S)
    return m.group(0) if m else ""


def main() -> None:
    lock = open("requirements.lock").read()
    block = torch_block(lock)
    version = re.match(r"torch==(\S+)", block).group(1)
    local = glob.glob(f"{LOCAL_WHEELS}/torch-{version}+cpu-*.whl")
    if local:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(block)
        subprocess.run([*PIP, "--no-index", "--find-links", LOCAL_WHEELS, "-r", f.name], check=True)
        os.unlink(f.name)
    subprocess.run([*PIP, "-r", "requirements.lock"], check=True)
    installed = importlib.metadata.version("torch")
    if "+cpu" not in installed:
        subprocess.run([*PIP, "-r", "requirements-cuda.lock"], check=True)
    # Editable as a sys.path entry (compat), not setuptools' default import hook: the hook maps
    # `codex_ml` to this checkout ahead of sys.path, so a copy of the repository (a queued
    # `dvc exp run`, a benchmark's snapshot of another commit) would run this checkout's code.
    subprocess.run([sys.executable, "-m", "pip", "install", "-qq", "--no-deps",
                    "--no-build-isolation", "-e", ".", "--config-settings", "editable_mode=compat"],
                   check=True)
    # DVC writes dvc.lock in place; codex_ml/dvc_atomic.py makes those writes atomic in every
    # process of this environment (see its docstring). Loaded as a file, not as part of the
    # codex_ml package, so no codex_ml is imported before a stage puts its own checkout first.
    # Guarded: a moved checkout must not break Python.
    atomic = os.path.abspath("codex_ml/dvc_atomic.py")
    with open(os.path.join(sysconfig.get_paths()["purelib"], "codex_dvc_atomic.pth"), "w") as f:
        f.write(f"import os, importlib.util as u; s = os.path.exists({atomic!r}) and "
                f"u.spec_from_file_location('codex_dvc_atomic', {atomic!r}); "
                "s and s.loader.exec_module(u.module_from_spec(s))\n")
    subprocess.run([sys.executable, "-m", "pip", "check"], check=True)
    print(f"installed: torch {installed}")


if __name__ == "__main__":
    main()
