# Sourced by the GPU scripts: environment for a lent GPU machine (no network, wheels carried in .whl/,
# data + a 50,176-piece tokenizer made on the CPU machine by bench/gpu_data.sh, carried in
# bench/out/gpu_data/).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1 TQDM_DISABLE=1
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then  # NO_WHL=1: a dry run on the CPU machine
  # Once per machine and set of wheels: a script sourcing this again must not reinstall under a
  # running one. (The image lacks dvc's dependencies, scmrepo and the rest, which dvclive needs.)
  mark=/tmp/site/.installed-$(ls .whl | md5sum | cut -c1-8)
  [ -f $mark ] || { python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 &&
    touch $mark; } || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
DATA=bench/out/gpu_data
stage() { local s=$1; shift; echo "== $s $(date +%T)"; python3 stages/$s.py "$@" 2>&1 | tail -n 4; }

# The benchmark shape (GPT-2-small-sized Llama decoder, context 1024) as a params file; each run
# below copies it into its own directory so runs on different GPUs never share params.yaml.
base_params() {
  printf "model: {n_layers: 12, hidden_size: 768, n_heads: 12, n_kv_heads: 12, intermediate_size: 2048, context_length: 1024}\ntrain: {block_size: 1024, lr: 0.0006, warmup_steps: 30, eval_every: 100000, save_every: 100000, log_every: 10, eval_batches: 2, engine: {compile: 'on'}}\n" > /tmp/b.yaml
  cp params.yaml /tmp/base.yaml && python3 tools/profile.py /tmp/b.yaml /tmp/base.yaml >/dev/null
}

# ddp NAME DEVICES DIST STEPS BATCH [COMPILE_MODE [COMPILE]] (more train keys: EXTRA='k: v', PATCH): the train stage (which relaunches
# itself under torchrun when DEVICES > 1) in /tmp/run_NAME; its metrics and the final checkpoint's
# loop state (the loss and tokens/s log) go to $OUT, one line of figures to stdout.
ddp() {
  local d=/tmp/run_$1; rm -rf $d; mkdir -p $d
  cp -r stages codex_ml configs tools requirements.lock $d/ && cp /tmp/base.yaml $d/params.yaml
  # PATCH='s/a/b/': a sed edit of this run's copy of the engine, to A/B a change of its code.
  [ -z "${PATCH:-}" ] || sed -i "$PATCH" $d/codex_ml/training/engine.py
  printf "train: {devices: %s, distributed: %s, max_steps: %s, batch_size: %s, engine: {compile_mode: %s, compile: '%s'}%s}\n" \
    "$2" "$3" "$4" "$5" "${6:-auto}" "${7:-on}" "${EXTRA:+, $EXTRA}" > $d/o.yaml
  local t0=$(date +%s)
  ( cd $d && python3 tools/profile.py o.yaml >/dev/null &&
    timeout ${RUN_TIMEOUT:-240} python3 stages/train_model.py --tokens $OLDPWD/$DATA/tokens --tokenizer $OLDPWD/$DATA/tokenizer \
      --out $d/model --metrics $OUT/train_$1.json > $OUT/log_$1.txt 2>&1 )
  echo "$1: rc=$? wall=$(( $(date +%s) - t0 ))s $(python3 -c "import json;m=json.load(open('$OUT/train_$1.json'));print('steady tokens/s', m['steady_tokens_per_s'], 'world', m['world_size'], 'steps', m['steps'], 'loss', round(m['final_train_loss'],3), 'mode', m['compile_mode'])" 2>&1 | tail -n 1)"
  python3 -c "import json,torch;print(json.dumps(torch.load('$d/models/checkpoints/checkpoint-$4/state.pt',weights_only=False)['state']))" > $OUT/state_$1.json 2>/dev/null
  [ -f $OUT/train_$1.json ] || grep -E "Error|error" $OUT/log_$1.txt | grep -v "^W1" | tail -n 3
}

# The device tool brings back at most 8 files from $OUT: the scripts that write more end with this,
# so all of them come back in one archive (all.tgz sorts first).
pack_out() { tar czf /tmp/all.tgz --exclude=./all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"; }
