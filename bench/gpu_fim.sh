#!/usr/bin/env bash
# The code-model figures on one H200: the GPU profile (profiles/gpu.yaml) trained with FIM (the
# default) and without (train.fim.rate 0) for the same STEPS, each scored by the evaluate stage
# (left-to-right bits/byte; infilling and HumanEval pass@k for the FIM model).
#   PART=fim bash bench/gpu_fim.sh     # data stages (once per machine), the FIM model, its evaluation
#   PART=plain bash bench/gpu_fim.sh   # the model without FIM, bits/byte only (HumanEval off)
# Each part fits one 10-minute device call; a part finding no data stages' outputs makes them.
set -uo pipefail
source bench/gpu_common.sh
STEPS=${STEPS:-1400}
NUM_SAMPLES=${NUM_SAMPLES:-10}
mkdir -p $OUT/$PART
python3 tools/profile.py profiles/gpu.yaml >/dev/null
printf "train: {devices: 1, max_steps: %s, num_workers: 6}\n" "$STEPS" > /tmp/steps.yaml
python3 tools/profile.py /tmp/steps.yaml >/dev/null
if [ ! -f data/tokens/manifest.json ]; then
  for s in ingest sanitize split train_tokenizer tokenize_splits; do stage $s; done
fi
cp metrics/{ingest,sanitize,split,tokenizer,tokenize}.json $OUT/$PART/ 2>/dev/null
if [ "$PART" = plain ]; then
  printf "train: {fim: {rate: 0.0}}\neval: {humaneval: {enabled: false}}\n" > /tmp/part.yaml
else
  printf "eval: {humaneval: {num_samples: %s}}\n" "$NUM_SAMPLES" > /tmp/part.yaml
fi
python3 tools/profile.py /tmp/part.yaml >/dev/null
cp params.yaml $OUT/$PART/params.yaml
stage train_model --out models/model_$PART --checkpoints models/ck_$PART --live metrics/train_$PART \
  --metrics $OUT/$PART/train.json
stage evaluate --model models/model_$PART --out data/eval_$PART --metrics $OUT/$PART/eval.json \
  --doc-scores $OUT/$PART/eval_docs.json
cp data/eval_$PART/humaneval.jsonl $OUT/$PART/ 2>/dev/null
git checkout params.yaml 2>/dev/null
python3 - "$OUT/$PART" <<'PY'
import json, sys
d = sys.argv[1]
t, e = (json.load(open(f"{d}/{n}.json")) for n in ("train", "eval"))
b = e["bits_per_byte"]
print(f"{d}: steps {t['steps']}, steady tokens/s {t['steady_tokens_per_s']}, val loss {t['best_val_loss']:.4f}, "
      f"test bits/byte {b['value']:.4f} [{b['ci_low']:.4f}, {b['ci_high']:.4f}]")
for k in ("infill", "humaneval"):
    if k in e:
        print(f"{k}: {json.dumps(e[k])[:600]}")
PY
echo "== $PART done $(date +%T)"
