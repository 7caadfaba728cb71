"""The GPU benchmark's own code, on the CPU (--cpu-smoke), so a script error never costs device
time: every variant kind runs, the profile and sync probes report, the JSON has the ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_training import workspace  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_every_variant_kind_on_the_cpu(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, ROOT / "bench" / "bench_train_gpu.py", "--cpu-smoke", "--seq", "64",
         "--steps", "12", "--skip", "4", "--profile", "2", "--sync-debug",
         "--tokenizer", workspace / "models" / "tokenizer", "--splits", workspace / "data" / "splits",
         "--variants", "baseline,baseline-causal=causal:1,engine,"
         "engine-blocking=blocking_copy:1+rope_table:0", "--out", out],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"baseline", "baseline-causal", "engine", "engine-blocking"}, r.stdout[-2000:]
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["losses"], name
        prof = row["profile"]
        assert prof["gpu_busy_ms_per_step"] > 0 and prof["top_kernels"], name
    assert rows["engine"]["ratio_vs_baseline"] > 0
