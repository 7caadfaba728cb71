#!/usr/bin/env bash
# One H200: the engine against the plain compiled loop with a GPU kernel profile of 5 steps each
# (time by kernel kind, the GPU's busy share, host syncs), and the levers being measured
# (VARIANTS overrides the list, see bench_train_gpu.py --variants; BATCH the per-step batch, default
# 16; SKIP, PROFILE: steps before the timed and profiled ones, steps profiled; TAG names this run's output files, to keep several runs of one call apart).
set -uo pipefail
source bench/gpu_common.sh
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -n 1; } | tee $OUT/gpu.txt
timeout ${BENCH_TIMEOUT:-540} python3 bench/bench_train_gpu.py \
  --tokenizer $DATA/tokenizer --tokens $DATA/tokens --steps ${STEPS:-200} --batch ${BATCH:-16} --skip ${SKIP:-50} --profile ${PROFILE:-5} --sync-debug \
  --variants "${VARIANTS:-baseline,engine,engine-fp8=float8:tensorwise,engine-fp8-body=float8:tensorwise+float8_skip:lm_head,engine-fp8-row=float8:rowwise}" \
  --out $OUT/bench_train_gpu${TAG:-}.json > $OUT/bench_full${TAG:-}.txt 2>&1
grep -E "tok/s|x baseline|profile|data:|FAILED|Traceback|Error|wrote|warning: the plain" $OUT/bench_full${TAG:-}.txt | tee $OUT/bench${TAG:-}.txt
# DUMP_KERNELS=1: the generated source of the top inductor kernels of every variant, as
# $OUT/kernels.tgz (each name as the profile lists it, cut at 90 characters, matched as a prefix).
if [ -n "${DUMP_KERNELS:-}" ]; then
  python3 - "$OUT/bench_train_gpu${TAG:-}.json" "$OUT/kernels.tgz" <<'PY'
import json, pathlib, sys, tarfile, tempfile
rows = json.load(open(sys.argv[1]))["rows"].values()
names = {n for r in rows for _, _, n in r.get("profile", {}).get("top_kernels", []) if n.startswith("triton_")}
root = pathlib.Path(tempfile.gettempdir()) / "torchinductor_root"
with tarfile.open(sys.argv[2], "w:gz") as tar:
    for f in root.rglob("*.py"):
        text = f.read_text(errors="replace")
        if any(f"def {n}" in text for n in names):
            tar.add(f, arcname=str(f.relative_to(root)))
print("kernel sources:", len(tarfile.open(sys.argv[2]).getnames()))
PY
fi
