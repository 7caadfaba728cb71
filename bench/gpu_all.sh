#!/usr/bin/env bash
# Everything GPU in one call on nvidia-h200-x2 (device time is scarce):
#   1. data for the benchmark (stdlib, 32k vocab) here, and for the GPU profile in /tmp/prof
#   2. DDP throughput 1 vs 2 GPUs (same per-GPU batch) and an FSDP run + evaluate, both GPUs
#   3. GPU 0: engine vs plain-loop benchmark  ||  GPU 1: GPU profile training, evaluate, report
set -uo pipefail
source bench/gpu_common.sh
PROFILE_TIME=${PROFILE_TIME:-240}
rm -rf /tmp/prof && mkdir /tmp/prof && cp -r stages codex_ml configs tools profiles params.yaml requirements.lock /tmp/prof/
rm -f /tmp/ddp_done
(
  cd /tmp/prof
  python3 tools/profile.py profiles/gpu.yaml
  printf "train: {max_time_s: %s, devices: 1}\n" "$PROFILE_TIME" > /tmp/budget.yaml
  python3 tools/profile.py /tmp/budget.yaml
  for s in ingest sanitize split train_tokenizer; do stage $s; done
  while [ ! -f /tmp/ddp_done ]; do sleep 2; done
  CUDA_VISIBLE_DEVICES=1 stage train_model
  CUDA_VISIBLE_DEVICES=1 stage evaluate
  stage report
  mkdir -p $OUT/profile; for f in metrics/*.json; do cp $f $OUT/profile/; done
  cp params.yaml $OUT/profile/params.yaml; cp reports/report.md $OUT/profile/ 2>/dev/null
  echo "== profile done $(date +%T)"
) > $OUT/profile.log 2>&1 &
PROF=$!

printf "tokenizer: {vocab_size: 32768}\nmodel: {n_layers: 12, hidden_size: 768, n_heads: 12, n_kv_heads: 12, intermediate_size: 2048, context_length: 1024}\ntrain: {block_size: 1024, lr: 0.0006, warmup_steps: 10, eval_every: 1000, save_every: 1000, log_every: 10, eval_batches: 2, compile: off}\neval: {max_docs: 4, completion: {num_prompts: 2}}\n" > /tmp/b.yaml
python3 tools/profile.py /tmp/b.yaml
for s in ingest sanitize split train_tokenizer; do stage $s; done
cp params.yaml /tmp/base.yaml
echo "== DDP / FSDP $(date +%T)"
ddp g1 1 ddp 60
ddp g2 2 ddp 60
ddp fsdp 2 fsdp 20
python3 stages/evaluate.py --model /tmp/m_fsdp --out /tmp/ev_fsdp --metrics $OUT/eval_fsdp.json 2>&1 | tail -n 1
touch /tmp/ddp_done
cp /tmp/base.yaml params.yaml
echo "== bench $(date +%T)"
CUDA_VISIBLE_DEVICES=0 python3 bench/bench_train_gpu.py --steps 200 --skip 50 \
  --variants baseline,engine,engine-liger --out $OUT/bench_train_gpu.json 2>&1 \
  | grep -E "tok/s|x baseline|data:|FAILED|Traceback" | tee $OUT/bench.txt
echo "== bench done $(date +%T)"
wait $PROF
grep -v "it/s\]" $OUT/profile.log | grep -E "INFO codex|error|Error|==" | tail -n 20
