#!/usr/bin/env bash
# Several GPUs, one call on nvidia-h200-x2: the train stage under torchrun, GPT-2-small shape,
# compiled (mode default on both sides, so only the GPU count differs), 300 steps:
#   2 x 16 (DDP) | then 1 x 16 on GPU 0 || 1 x 32 on GPU 1   -> scaling at equal per-GPU batch
#                                                               and loss at equal global batch (32)
# then the GPU tests: defaults on one GPU, DDP kill -9 + resume across ranks, FSDP save + load.
set -uo pipefail
source bench/gpu_common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, transformers, peft, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__)" | tee -a $OUT/gpu.txt
base_params
echo "== ddp $(date +%T)"
ddp g2_b16 2 ddp 300 16
CUDA_VISIBLE_DEVICES=0 ddp g1_b16 1 ddp 300 16 > $OUT/g1_b16.line 2>&1 &
CUDA_VISIBLE_DEVICES=1 ddp g1_b32 1 ddp 300 32
wait; cat $OUT/g1_b16.line
echo "== gpu tests $(date +%T)"
timeout 330 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tail -n 25 | tee $OUT/pytest_gpu.txt
echo "== done $(date +%T)"
