"""Regenerate requirements.lock (+ requirements-cuda.lock) from requirements.in.

pip-compile here would pin `torch==2.13.0+cpu` (a local CPU wheel PyPI lacks). So we resolve
against PyPI alone, where torch 2.13.0 is the CUDA build, then:
  * move torch's GPU-only dependencies (nvidia-*, cuda-*, triton) to requirements-cuda.lock,
    installed only when the torch that got installed is a CUDA build;
  * add the hash of the local CPU wheel (if this machine has one) to the torch line, so the same
    `torch==2.13.0` pin installs the CPU wheel here and the CUDA wheel on a plain PyPI machine.
Both files are installed with `pip install --require-hashes --no-deps`, then `pip check`.
"""

import glob
import hashlib
import os
import re
import subprocess
import sys
import tempfile

GPU_ONLY = re.compile(r"^(nvidia-(?!ml-py)|cuda-|triton\b|liger-kernel)")
LOCAL_WHEELS = os.environ.get("CODEX_LOCAL_WHEELS", "/opt/wheels")


def blocks(text: str) -> tuple[str, list[str]]:
    """Split pip-compile output into its header and one block per requirement."""
    lines = text.splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if re.match(r"^[A-Za-z0-9]", line))
    header, out, cur = "".join(lines[:i]), [], []
    for line in lines[i:]:
        if re.match(r"^[A-Za-z0-9]", line) and cur:
            out.append("".join(cur))
            cur = []
        cur.append(line)
    out.append("".join(cur))
    return header, out


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        raw = os.path.join(d, "raw.lock")
        # pip-compile keeps the pins of an existing output file (unless --upgrade is given):
        # start from the current lock so adding a dependency moves no other package.
        if os.path.exists("requirements.lock") and "--upgrade" not in sys.argv:
            with open("requirements.lock") as f, open(raw, "w") as out:
                out.write(f.read())
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # no local find-links or mirrors: PyPI's view only
        subprocess.run([sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes",
                        "--allow-unsafe", "--strip-extras", "--no-emit-index-url",
                        "--index-url", "https://pypi.org/simple", "--output-file", raw,
                        *(["--upgrade"] if "--upgrade" in sys.argv else []),
                        "requirements.in"], check=True, env=env)
        header, reqs = blocks(open(raw).read().replace(raw, "requirements.lock"))
    main_blocks, gpu_blocks = [], []
    for b in reqs:
        (gpu_blocks if GPU_ONLY.match(b) else main_blocks).append(b)
    torch_i = next(i for i, b in enumerate(main_blocks) if b.startswith("torch=="))
    version = re.match(r"torch==([^ ]+)", main_blocks[torch_i]).group(1)
    for whl in sorted(glob.glob(f"{LOCAL_WHEELS}/torch-{version}+cpu-*.whl")):
        digest = hashlib.sha256(open(whl, "rb").read()).hexdigest()
        main_blocks[torch_i] = main_blocks[torch_i].replace(
            " \\\n", f" \\\n    --hash=sha256:{digest} \\\n", 1)
        print(f"added local CPU wheel {os.path.basename(whl)}")
    note = ("# Install: pip install --require-hashes --no-deps -r requirements.lock\n"
            "# (then requirements-cuda.lock when torch is a CUDA build). Made by `make lock`.\n")
    open("requirements.lock", "w").write(header + note + "".join(main_blocks))
    open("requirements-cuda.lock", "w").write(
        "# torch's GPU-only dependencies, installed when the installed torch is a CUDA build.\n"
        + note + "".join(gpu_blocks))
    print(f"requirements.lock: {len(main_blocks)} packages; "
          f"requirements-cuda.lock: {len(gpu_blocks)} packages")


if __name__ == "__main__":
    main()
