#!/usr/bin/env bash
# The GPU profile on one H200 (any GPU kind): profiles/gpu.yaml (site-packages corpus, 32k vocab,
# GPT-2-small-sized model) with a training-time budget, every stage, then the report.
#   PROFILE_TIME=240 bash bench/gpu_profile.sh     # first session: 0.596 test bits/byte
#   PROFILE_TIME=170 ...                           # session 8: 0.610, the whole pipeline in 6.6 min
#   PROFILE_TIME=110 ...                           # session 9, with the report's figures
set -uo pipefail
source bench/gpu_common.sh
PROFILE_TIME=${PROFILE_TIME:-240}  # a safety net: the profile itself ends first since session 10
python3 tools/profile.py profiles/gpu.yaml
printf "train: {max_time_s: %s, devices: 1}\n" "$PROFILE_TIME" > /tmp/budget.yaml
python3 tools/profile.py /tmp/budget.yaml
mkdir -p $OUT/profile; cp params.yaml $OUT/profile/
# Each stage's metrics as soon as it ends: a call cut short still brings back what it measured.
for s in ingest sanitize split train_tokenizer tokenize_splits train_model evaluate report; do
  stage $s; cp metrics/*.json $OUT/profile/ 2>/dev/null; done
cp -r reports/report.md reports/figures $OUT/profile/ 2>/dev/null
git checkout params.yaml 2>/dev/null
echo "== profile done $(date +%T)"
pack_out  # more than the 8 files the device tool brings back one by one
