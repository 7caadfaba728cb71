# codex-pipeline. On a fresh machine: `make repro` (set up + run the pipeline) or `make test`.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
# dvc.yaml's commands say `python stages/...`: that must be the virtualenv's python.
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup repro test test-fast lock bench audit docs clean

setup: $(VENV)/.installed

# The lock pins exact versions with hashes; --no-deps because the lock is the full closure.
# torch==2.13.0 has hashes for both the local CPU wheel and PyPI's CUDA wheels; the GPU-only
# libraries (requirements-cuda.lock) are added only when a CUDA torch was installed.
$(VENV)/.installed: requirements.lock requirements-cuda.lock pyproject.toml tools/install.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python tools/install.py
	touch $@

repro: setup
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lock:
	$(BIN)/python tools/lock.py

# The CPU benchmarks; with a CUDA GPU also the GPU kernels' (the GPU training runs are bench/gpu_*.sh).
bench: setup
	for b in bench/bench_sanitize.py bench/bench_train_cpu.py; do $(BIN)/python $$b || exit 1; done
	if $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	  for b in bench/bench_adamw.py bench/bench_fused_ce.py bench/bench_gemm.py; do $(BIN)/python $$b || exit 1; done; fi

audit: setup
	$(BIN)/python -m pip install -qq pip-audit detect-secrets
	$(BIN)/pip-audit --strict -r requirements.lock --no-deps --disable-pip || echo "pip-audit: vulnerability database unreachable or findings above"
	$(BIN)/python tools/secret_scan.py

# docs/params.md from codex_ml/params.py's schema (tests/test_docs.py fails when it is stale).
docs:
	$(BIN)/python tools/gen_params_doc.py

clean:
	rm -rf $(VENV)
