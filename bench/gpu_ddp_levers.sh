#!/usr/bin/env bash
# Where DDP's extra time goes (nvidia-h200-x2, one call of ~7 minutes). Session 6's profile: NCCL
# ran the fp32 gradient all-reduce with its LL protocol (ring, half the link bandwidth, SMs busy
# all along) and the matmuls overlapping it slowed by 3 ms a step. Each lever is an environment
# variable of NCCL's, so no code changes between runs:
#   1 GPU at PER_GPU_BATCH x 1024 (the reference), then 2 GPUs: as is, NCCL_PROTO=Simple, and
#   NCCL_PROTO=Simple with NCCL_MAX_NCHANNELS=8 (fewer SMs for communication).
set -uo pipefail
source bench/gpu_common.sh
base_params
B=${PER_GPU_BATCH:-16}
RUN_TIMEOUT=110 CUDA_VISIBLE_DEVICES=0 ddp g1_b$B 1 ddp 300 $B
RUN_TIMEOUT=120 ddp g2_b$B 2 ddp 300 $B
RUN_TIMEOUT=120 NCCL_PROTO=Simple ddp g2_b${B}_simple 2 ddp 300 $B
RUN_TIMEOUT=120 NCCL_PROTO=Simple NCCL_MAX_NCHANNELS=8 ddp g2_b${B}_simple_ch8 2 ddp 300 $B
echo "== done $(date +%T)"
pack_out
