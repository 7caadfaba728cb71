#!/usr/bin/env bash
# Where DDP's extra time goes (nvidia-h200-x2, one call of ~7 minutes). Session 6's profile: NCCL
# ran the fp32 gradient all-reduce with its LL protocol and the matmuls overlapping it slowed by
# 3 ms a step; session 7: NCCL_PROTO=Simple changed nothing (1.83x either way, CUDA graphs on).
# Against the 1-GPU reference in the same call (all with the stage's defaults, CUDA graphs
# included): bf16 gradient all-reduce (train.ddp_allreduce, half the bytes) and
# NCCL_MAX_NCHANNELS=8 (fewer SMs for communication). Session 8: 1.83x plain, 1.78x bf16,
# 1.80x with 8 channels (bench/RESULTS_GPU.md §2).
set -uo pipefail
source bench/gpu_common.sh
base_params
B=${PER_GPU_BATCH:-16}
RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b$B 1 ddp 300 $B
RUN_TIMEOUT=120 ddp g2_b$B 2 ddp 300 $B
RUN_TIMEOUT=120 EXTRA='ddp_allreduce: bf16' ddp g2_b${B}_bf16 2 ddp 300 $B
RUN_TIMEOUT=120 NCCL_MAX_NCHANNELS=8 ddp g2_b${B}_ch8 2 ddp 300 $B
echo "== done $(date +%T)"
pack_out
