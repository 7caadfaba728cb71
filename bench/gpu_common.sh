# Sourced by the GPU scripts: environment for a lent GPU machine (no network, wheels carried in .whl/).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
stage() { local s=$1; shift; echo "== $s $(date +%T)"; python3 stages/$s.py "$@" 2>&1 | tail -n 4; }

# ddp NAME DEVICES DIST STEPS: the train stage on /tmp/base.yaml's params with these overrides,
# one line of figures (tokens/s, world size, steps, loss) per run; logs and metrics go to $OUT.
ddp() {
  cp /tmp/base.yaml params.yaml
  printf "train: {devices: %s, batch_size: 16, distributed: %s, max_steps: %s}\n" "$2" "$3" "$4" > /tmp/o.yaml
  python3 tools/profile.py /tmp/o.yaml >/dev/null; rm -rf models/checkpoints
  local t0=$(date +%s)
  python3 stages/train_model.py --out /tmp/m_$1 --metrics $OUT/train_$1.json > $OUT/log_$1.txt 2>&1
  echo "$1: rc=$? wall=$(( $(date +%s) - t0 ))s $(python3 -c "import json;m=json.load(open('$OUT/train_$1.json'));print('tokens/s', m['tokens_per_s'], 'world', m['world_size'], 'steps', m['steps'], 'loss', round(m['final_train_loss'],3), 'params', m['params'])" 2>&1 | tail -n 1)"
  [ -f $OUT/train_$1.json ] || grep -E "Error" $OUT/log_$1.txt | grep -v "^W1129" | tail -n 3
}
