#!/usr/bin/env bash
# One H200: the owned training loop against the plain compiled loop (bench_train_gpu.py, GPT-2-small
# shape, 16 x 1024, 200 steps, each variant in its own process), then the train stage itself with
# the GPU defaults (300 steps, checkpoints, the saved model) and the CUDA tests (tests/test_gpu.py).
# Carry [".whl", "bench/out/gpu_data"] (bench/gpu_data.sh makes the data). PART=bench|stage|tests|all.
set -uo pipefail
source bench/gpu_common.sh
PART=${PART:-all}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee $OUT/gpu.txt
if [ $PART = all ] || [ $PART = bench ]; then
  timeout ${BENCH_TIMEOUT:-360} python3 bench/bench_train_gpu.py --tokenizer $DATA/tokenizer --tokens $DATA/tokens \
    --steps ${STEPS:-200} --batch ${BATCH:-16} --skip 50 --variants "${VARIANTS:-baseline,engine}" \
    --out $OUT/bench_train_gpu.json > $OUT/bench_full.txt 2>&1
  grep -E "tok/s|x baseline|data:|FAILED|Traceback|Error|wrote|warning" $OUT/bench_full.txt | tail -n 30
fi
if [ $PART = all ] || [ $PART = stage ]; then
  base_params
  EXTRA="save_every: 150, eval_every: 150" ddp stage1 1 ddp 300 16
  tail -n 5 $OUT/log_stage1.txt
  python3 -c "from transformers import AutoModelForCausalLM as A; m=A.from_pretrained('/tmp/run_stage1/model'); print('saved model loads:', type(m).__name__, sum(p.numel() for p in m.parameters()))"
fi
if [ $PART = all ] || [ $PART = tests ]; then
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -x tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -n 25
fi
