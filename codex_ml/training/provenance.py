"""Where a model came from: provenance.json and the README.md model card."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .. import io


def git_commit() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10,
                                   check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None}


def devices() -> list[str]:
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [f"cpu: {cpu} ({torch.get_num_threads()} threads)"]


def provenance(seed: int, world_size: int, lock: str | Path = "requirements.lock") -> dict:
    import peft
    import transformers

    lock = Path(lock)
    return {
        "git": git_commit(),
        "requirements_lock_sha256": io.sha256_file(lock) if lock.exists() else None,
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "devices": devices(), "world_size": world_size, "seed": seed,
    }


def model_card(*, params: dict, manifest: dict, metrics: dict, prov: dict, lora: bool) -> str:
    m = metrics
    val = m.get("best_val_loss")
    rows = "\n".join(f"| {k} | {v} |" for k, v in m.items())
    base = params["model"].get("base") or "none (trained from scratch)"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [code, codex-pipeline{', lora' if lora else ''}]
---
# Code language model (codex-pipeline)

A causal language model for source code, trained by the `train_model` stage of codex-pipeline.

- Initialisation: `{params['model']['init']}`; base model: {base}
- Data version: `{manifest.get('dataset_version', 'unknown')}` (data/splits/manifest.json, data/tokens/manifest.json)
- Steps: {m.get('steps')}, tokens seen: {m.get('tokens'):,}, best val loss: {val if val is None else f'{val:.4f}'} nats/token
- Code: git `{prov['git'].get('commit')}`{' (uncommitted changes)' if prov['git'].get('dirty') else ''}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("models/model")
model = AutoModelForCausalLM.from_pretrained("models/model")
```
or `codex generate --prompt "def parse("`.{chr(10) + chr(10) + 'The LoRA adapter alone is in `adapter/` (load with `peft.PeftModel`).' if lora else ''}

## Metrics

| metric | value |
|---|---|
{rows}

## Params

```json
{json.dumps(params, indent=2, sort_keys=True, default=str)}
```

## Provenance

```json
{json.dumps(prov, indent=2, sort_keys=True)}
```

## Limitations

Trained on a small code corpus for a short budget: it completes code plausibly but is not a
reliable programming assistant. It may reproduce fragments of its training data.
"""
