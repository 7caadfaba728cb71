#!/usr/bin/env bash
# Re-measure after removing accelerate's fp32 copy of the logits (nvidia-h200-x2, one call):
#   GPU 0: engine vs plain loop || GPU 1: 1 x 16 stage run (scaling reference), 1-GPU tests
#   then both GPUs: 2 x 16 DDP stage run, the DDP kill -9/resume and FSDP tests, DDP with 100 MB buckets.
set -uo pipefail
source bench/gpu_common.sh
base_params
( CUDA_VISIBLE_DEVICES=1 ddp g1_b16 1 ddp 300 16
  CUDA_VISIBLE_DEVICES=1 timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    -k "defaults or attention" 2>&1 | tail -n 3 ) > $OUT/gpu1.txt 2>&1 &
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/bench_train_gpu.py \
  --tokenizer $DATA/tokenizer --splits $DATA/splits --steps 200 --skip 50 \
  --variants "baseline,engine,engine-default=compile_mode:default" \
  --out $OUT/bench_train_gpu.json 2>&1 | grep -E "tok/s|x baseline|data:|FAILED|Traceback|wrote" | tee $OUT/bench.txt
wait; cat $OUT/gpu1.txt
echo "== 2 GPUs $(date +%T)"
RUN_TIMEOUT=180 ddp g2_b16 2 ddp 300 16
timeout 220 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -k "ddp or fsdp" 2>&1 | tail -n 15 | tee $OUT/pytest_ddp.txt
echo "== buckets $(date +%T)"
EXTRA="ddp_bucket_mb: 100" RUN_TIMEOUT=150 ddp g2_b16_bk100 2 ddp 300 16
echo "== done $(date +%T)"
