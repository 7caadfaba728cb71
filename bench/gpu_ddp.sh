#!/usr/bin/env bash
# Several GPUs (nvidia-h200-x2): the train stage under torchrun. Throughput at the same per-GPU
# batch (1 vs 2 GPUs), loss curves at the same global batch, FSDP, and resume across ranks after
# a kill -9. Results land in $OUT.
set -uo pipefail
source bench/gpu_common.sh
STEPS=${STEPS:-120}
printf "tokenizer: {vocab_size: 32768}\nmodel: {n_layers: 12, hidden_size: 768, n_heads: 12, n_kv_heads: 12, intermediate_size: 2048, context_length: 1024}\ntrain: {block_size: 1024, lr: 0.0006, warmup_steps: 20, eval_every: 1000, save_every: 1000, log_every: 10, eval_batches: 4}\n" > /tmp/ddp.yaml
python3 tools/profile.py /tmp/ddp.yaml
for s in ingest sanitize split train_tokenizer; do stage $s; done
cp params.yaml /tmp/ddp_base.yaml

run() {  # run NAME DEVICES BATCH DIST COMPILE STEPS
  cp /tmp/ddp_base.yaml params.yaml
  printf "train: {devices: %s, batch_size: %s, distributed: %s, compile: %s, max_steps: %s}\n" "$2" "$3" "$4" "$5" "$6" > /tmp/o.yaml
  python3 tools/profile.py /tmp/o.yaml >/dev/null
  rm -rf models/checkpoints /tmp/m_$1
  local t0=$(date +%s)
  python3 stages/train_model.py --out /tmp/m_$1 --metrics $OUT/train_$1.json > $OUT/log_$1.txt 2>&1
  local rc=$?
  cp metrics/train/plots/metrics/loss.tsv $OUT/loss_$1.tsv 2>/dev/null
  echo "$1: rc=$rc wall=$(( $(date +%s) - t0 ))s $(python3 -c "import json;m=json.load(open('$OUT/train_$1.json'));print('tokens/s', m.get('tokens_per_s'), 'steps', m.get('steps'), 'loss', m.get('final_train_loss'))" 2>/dev/null)"
  [ $rc = 0 ] || grep -E "Error|error" $OUT/log_$1.txt | tail -n 5
}
echo "== throughput, same per-GPU batch 16, compiled"
run g1 1 16 ddp on $STEPS
run g2 2 16 ddp on $STEPS
echo "== loss curves, same global batch 32 (1x32 vs 2x16), not compiled"
run c1 1 32 ddp off 100
run c2 2 16 ddp off 100
echo "== FSDP on 2 GPUs"
run fsdp 2 16 fsdp off 30
python3 stages/evaluate.py --model /tmp/m_fsdp --out /tmp/ev_fsdp --metrics $OUT/eval_fsdp.json 2>&1 | tail -n 1
echo "== resume across ranks after kill -9"
cp /tmp/ddp_base.yaml params.yaml
printf "train: {devices: 2, batch_size: 16, compile: off, max_steps: 60, save_every: 20}\n" > /tmp/o.yaml
python3 tools/profile.py /tmp/o.yaml >/dev/null
rm -rf models/checkpoints
setsid python3 stages/train_model.py --out /tmp/m_res --metrics $OUT/train_res.json > $OUT/log_res1.txt 2>&1 &
P=$!
for i in $(seq 1 120); do sleep 1; ls models/checkpoints 2>/dev/null | grep -q "checkpoint-40" && break; done
kill -9 -- -$P 2>/dev/null; sleep 2; echo "killed at: $(ls models/checkpoints)"
python3 stages/train_model.py --out /tmp/m_res --metrics $OUT/train_res.json > $OUT/log_res2.txt 2>&1
echo "resume rc=$? $(grep -iE 'resum' $OUT/log_res2.txt | head -n 2) steps=$(python3 -c "import json;print(json.load(open('$OUT/train_res.json'))['steps'])")"
python3 - <<'P'
import json, os
out = os.environ["OUT"]
def tps(n):
    try: return json.load(open(f"{out}/train_{n}.json"))["tokens_per_s"]
    except Exception: return None
g1, g2 = tps("g1"), tps("g2")
if g1 and g2: print(f"DDP scaling: 1 GPU {g1:,.0f} tok/s, 2 GPUs {g2:,.0f} tok/s, {g2/g1:.2f}x")
def losses(n):
    rows = [l.split("\t") for l in open(f"{out}/loss_{n}.tsv").read().split("\n")[1:] if l]
    return {int(r[0]): float(r[1]) for r in rows}
try:
    a, b = losses("c1"), losses("c2")
    common = sorted(set(a) & set(b))
    gap = sum(abs(a[s] - b[s]) for s in common) / len(common)
    print(f"loss curves 1x32 vs 2x16: {len(common)} common steps, mean |gap| {gap:.3f}, final {a[common[-1]]:.3f} vs {b[common[-1]]:.3f}")
except Exception as e: print("loss compare failed:", e)
P
