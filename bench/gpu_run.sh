#!/usr/bin/env bash
# One H200 call (nvidia-h200-x2): GPU 0 runs the engine-vs-baseline benchmark on stdlib data with a
# 32k tokenizer; GPU 1 runs the GPU profile (profiles/gpu.yaml) end to end: data stages, training
# under a wall-clock budget, evaluate, report. Results land in $OUT.
set -uo pipefail
source bench/gpu_common.sh
PROFILE_TIME=${PROFILE_TIME:-280}
STEPS=${STEPS:-200}

# (a) the GPU profile, in its own copy of the repo, in the background
rm -rf /tmp/prof && mkdir /tmp/prof && cp -r stages codex_ml configs tools profiles params.yaml requirements.lock /tmp/prof/
(
  cd /tmp/prof
  python3 tools/profile.py profiles/gpu.yaml
  printf "train: {max_time_s: %s, devices: 1}\n" "$PROFILE_TIME" > /tmp/budget.yaml
  python3 tools/profile.py /tmp/budget.yaml
  for s in ingest sanitize split train_tokenizer; do stage $s; done
  CUDA_VISIBLE_DEVICES=1 stage train_model
  CUDA_VISIBLE_DEVICES=1 stage evaluate
  stage report
  cp metrics/*.json $OUT/ 2>/dev/null; mkdir -p $OUT/profile
  cp reports/report.html $OUT/profile/ 2>/dev/null
  cp params.yaml $OUT/profile/params.yaml
  echo "== profile done $(date +%T)"
) > $OUT/profile.log 2>&1 &
PROF=$!

# (b) the benchmark on GPU 0: stdlib corpus, 32k vocab, GPT-2-small shape
printf "tokenizer: {vocab_size: 32768}\n" > /tmp/bench.yaml
python3 tools/profile.py /tmp/bench.yaml
for s in ingest sanitize split train_tokenizer; do stage $s; done
CUDA_VISIBLE_DEVICES=0 python3 bench/bench_train_gpu.py --steps $STEPS --skip 50 \
  --variants baseline,engine,engine-nofuse --out $OUT/bench_train_gpu.json 2>&1 \
  | grep -E "tok/s|x baseline|data:|Error|error|Traceback" | tee $OUT/bench.txt
echo "== bench done $(date +%T)"
wait $PROF
grep -v "it/s\]" $OUT/profile.log | grep -E "INFO codex|error|Error|==" | tail -n 25
