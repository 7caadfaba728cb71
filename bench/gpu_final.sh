#!/usr/bin/env bash
# Re-measure after a change to the engine (nvidia-h200-x2, one call of ~8 minutes):
#   GPU 0: engine vs plain loop at 16 x 1024 (VARIANTS16) and 32 x 1024 (VARIANTS32; "none" skips)
#   || GPU 1: the 1-GPU stage run at PER_GPU_BATCH x 1024 (default 16; the DDP scaling reference),
#      then the 1-GPU tests (TESTS: a pytest -k expression)
#   then both GPUs: the DDP stage run at PER_GPU_BATCH per GPU; DDP_TESTS=1 adds the DDP kill -9/resume
#   and FSDP tests; DDP_PROFILE=1 the engine under torchrun with a kernel profile (NCCL included).
set -uo pipefail
source bench/gpu_common.sh
base_params
B=${PER_GPU_BATCH:-16}
( export CUDA_VISIBLE_DEVICES=1
  ddp g1_b$B 1 ddp 300 $B
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
    -rfE -k "${TESTS:-not ddp and not fsdp}" > $OUT/pytest_1gpu.txt 2>&1
  grep -E "^(FAILED|ERROR|E )|passed|failed" $OUT/pytest_1gpu.txt | tail -n 30 ) > $OUT/gpu1.txt 2>&1 &
CUDA_VISIBLE_DEVICES=0 STEPS=200 BENCH_TIMEOUT=${B16_TIMEOUT:-230} \
  VARIANTS="${VARIANTS16:-baseline,baseline-causal=causal:1,engine,engine-no-rope-table=engine.rope_table:off}" \
  bash bench/gpu_levers.sh
if [ "${VARIANTS32:-}" != none ]; then
  CUDA_VISIBLE_DEVICES=0 STEPS=120 BATCH=32 TAG=_b32 BENCH_TIMEOUT=${B32_TIMEOUT:-130} \
    VARIANTS="${VARIANTS32:-baseline,engine}" bash bench/gpu_levers.sh
fi
wait; echo "== GPU 1 (1 x $B stage run, 1-GPU tests)"; cat $OUT/gpu1.txt
echo "== 2 GPUs $(date +%T)"
RUN_TIMEOUT=${DDP_TIMEOUT:-150} ddp g2_b$B 2 ddp 300 $B
if [ -n "${DDP_PROFILE:-}" ]; then
  timeout 200 python3 -m torch.distributed.run --standalone --nproc_per_node 2 bench/bench_train_gpu.py --tokenizer $DATA/tokenizer \
    --tokens $DATA/tokens --steps 150 --batch $B --skip 50 --profile 5 --variants engine \
    --out $OUT/bench_ddp.json > $OUT/bench_ddp_full.txt 2>&1
  grep -E "tok/s|profile|FAILED|Error" $OUT/bench_ddp_full.txt | tee $OUT/bench_ddp.txt
fi
if [ -n "${DDP_TESTS:-}" ]; then
  timeout 220 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rfE -k "ddp or fsdp" \
    2>&1 | tail -n 15 | tee $OUT/pytest_ddp.txt
fi
echo "== done $(date +%T)"
pack_out
