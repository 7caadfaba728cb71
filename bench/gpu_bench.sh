#!/usr/bin/env bash
# One H200 (GPU 0 of nvidia-h200-x2): the engine against the plain compiled loop, GPT-2-small shape,
# vocab 50,176, batch 16 x 1024, 200 steps, on the carried stdlib data. One row per lever.
# GPU 1 meanwhile: the train stage itself with the engine's GPU defaults (CUDA graphs), 300 steps.
set -uo pipefail
source bench/gpu_common.sh
base_params
CUDA_VISIBLE_DEVICES=1 ddp g1_auto 1 ddp 300 16 reduce-overhead > $OUT/g1_auto.line 2>&1 &
CUDA_VISIBLE_DEVICES=0 timeout ${BENCH_TIMEOUT:-540} python3 bench/bench_train_gpu.py \
  --tokenizer $DATA/tokenizer --tokens $DATA/tokens --steps 200 --skip 50 \
  --variants "${VARIANTS:-baseline,engine,engine-default=engine.compile_mode:default,baseline-ro=mode:reduce-overhead,engine-cudnn=engine.attention:cudnn,engine-mat=engine.compile_mode:max-autotune}" \
  --out $OUT/bench_train_gpu.json 2>&1 | grep -E "tok/s|x baseline|data:|FAILED|Traceback|wrote" | tee $OUT/bench.txt
wait; cat $OUT/g1_auto.line
