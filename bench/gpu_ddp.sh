#!/usr/bin/env bash
# Several GPUs (nvidia-h200-x2): the train stage under torchrun, GPT-2-small shape, not compiled.
# Throughput 1 vs 2 GPUs at the same per-GPU batch; FSDP run whose saved model is evaluated.
set -uo pipefail
source bench/gpu_common.sh
printf "model: {n_layers: 12, hidden_size: 768, n_heads: 12, n_kv_heads: 12, intermediate_size: 2048, context_length: 1024}\ntrain: {block_size: 1024, lr: 0.0006, warmup_steps: 10, eval_every: 1000, save_every: 1000, log_every: 10, eval_batches: 2, compile: 'off'}\neval: {max_docs: 4, completion: {num_prompts: 2}}\n" > /tmp/b.yaml
python3 tools/profile.py /tmp/b.yaml || exit 1
for s in ingest sanitize split train_tokenizer; do stage $s; done
cp params.yaml /tmp/base.yaml
ddp g1 1 ddp 80
ddp g2 2 ddp 80
ddp fsdp 2 fsdp 20
python3 stages/evaluate.py --model /tmp/m_fsdp --out /tmp/ev_fsdp --metrics $OUT/eval_fsdp.json 2>&1 | tail -n 1
python3 -c "
import json
a=json.load(open('$OUT/train_g1.json'))['tokens_per_s']; b=json.load(open('$OUT/train_g2.json'))['tokens_per_s']
print(f'DDP scaling at per-GPU batch 16x1024: 1 GPU {a:,.0f} tok/s, 2 GPUs {b:,.0f} tok/s = {b/a:.2f}x')"
