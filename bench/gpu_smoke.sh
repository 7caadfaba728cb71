#!/usr/bin/env bash
# A short check of every GPU code path (run on nvidia-h200-x2 before the long runs).
set -uo pipefail
source bench/gpu_common.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, torch.cuda.device_count())"
python3 -c "import dvclive, pydantic, liger_kernel, evaluate; print('imports ok')"
cat > /tmp/smoke.yaml <<'Y'
train: {max_steps: 30, eval_every: 15, save_every: 15, log_every: 5, batch_size: 16}
eval: {max_docs: 6, completion: {num_prompts: 4}}
Y
python3 tools/profile.py /tmp/smoke.yaml
for s in ingest sanitize split train_tokenizer tokenize_splits train_model evaluate report; do stage $s; done
cp metrics/train.json $OUT/smoke_train.json; cp metrics/eval.json $OUT/smoke_eval.json 2>/dev/null
echo "== ddp $(date +%T)"
rm -rf models/checkpoints
torchrun --standalone --nproc_per_node 2 stages/train_model.py --out /tmp/ddp_model --metrics $OUT/smoke_ddp.json 2>&1 | grep -vi warn | tail -n 6
echo "== bench $(date +%T)"
timeout 240 python3 bench/bench_train_gpu.py --steps 60 --skip 20 --out $OUT/smoke_bench.json 2>&1 | grep -E "tok/s|x baseline|data:|Error|error" | tail -n 12
echo "== done $(date +%T)"
