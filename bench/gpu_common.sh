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
