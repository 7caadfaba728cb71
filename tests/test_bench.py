"""The GPU benchmark's own code, on the CPU (--cpu-smoke), so a script error never costs device
time: every variant kind runs, the profile and sync probes report, the JSON has the ratios; and the
plain loop trains on the engine's batches in the engine's order; the chunked linear cross-entropy
variant gives transformers' loss and gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import workspace  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~1 min: one process per variant
def test_gpu_benchmark_runs_every_variant_kind_on_the_cpu(workspace, tmp_path):  # noqa: F811
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, ROOT / "bench" / "bench_train_gpu.py", "--cpu-smoke", "--seq", "64",
         "--steps", "12", "--skip", "4", "--profile", "2", "--sync-debug",
         "--tokenizer", workspace / "models" / "tokenizer", "--tokens", workspace / "data" / "tokens",
         "--variants", "baseline,baseline-causal=causal:1,engine,"
         "engine-levers=engine.rope_table:off+engine.loss:fused+engine.causal_attention:off"
         "+inductor:coordinate_descent_tuning/triton.mix_order_reduction=0+engine.fused_clip:off"
         "+engine.bf16_residual:off+engine.fused_proj:qkv+engine.bf16_weights:off"
         "+engine.fused_adamw:off+engine.cublas_workspace:on+engine.deferred_logs:off+log_every:2",
         "--out", out],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"baseline", "baseline-causal", "engine", "engine-levers"}, r.stdout[-2000:]
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["losses"], name
        prof = row["profile"]
        assert prof["gpu_busy_ms_per_step"] > 0 and prof["top_kernels"], name
        assert prof["idle_gaps"]["kernels_per_step"] > 0, name
        assert isinstance(prof["idle_gaps"]["memsets_before"], list), name
    assert rows["engine"]["ratio_vs_baseline"] > 0
    assert len({row["pid"] for row in rows.values()}) == 4  # each variant in a process of its own
    # The engine alone in another process, its ratio against the plain loop's row of the first.
    out2 = tmp_path / "engine.json"
    r = subprocess.run(
        [sys.executable, ROOT / "bench" / "bench_train_gpu.py", "--cpu-smoke", "--seq", "64",
         "--steps", "12", "--skip", "4", "--tokenizer", workspace / "models" / "tokenizer",
         "--tokens", workspace / "data" / "tokens", "--variants", "engine", "--baseline-from", out,
         "--out", out2], capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads(out2.read_text())["rows"]
    assert again["baseline"]["tokens_per_s"] == rows["baseline"]["tokens_per_s"]
    assert again["engine"]["ratio_vs_baseline"] == round(
        again["engine"]["tokens_per_s"] / rows["baseline"]["tokens_per_s"], 3)


def test_gpu_benchmark_runs_the_engine_under_torchrun(workspace, tmp_path):  # noqa: F811
    """Two ranks (gloo here, NCCL on GPUs): DDP throughput and its kernel profile, rank 0 reports,
    also with the bf16 all-reduce; the plain loop is skipped (one GPU only)."""
    out = tmp_path / "ddp.json"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         ROOT / "bench" / "bench_train_gpu.py", "--cpu-smoke", "--seq", "64", "--steps", "12",
         "--skip", "4", "--profile", "2", "--tokenizer", workspace / "models" / "tokenizer",
         "--tokens", workspace / "data" / "tokens", "--variants",
         "baseline,engine,engine-bf16=ddp_allreduce:bf16", "--out", out],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and set(report["rows"]) == {"engine", "engine-bf16"}
    for row in report["rows"].values():
        assert row["tokens_per_s"] > 0 and row["profile"]


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_train_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_plain_loop_draws_the_engines_batches_in_the_engines_order(workspace, tmp_path):  # noqa: F811
    """The benchmark compares the two loss curves step by step, so the plain loop must train on the
    same batches in the same order as the engine, across epochs."""
    import torch
    from test_training import params

    from codex_ml import modeling
    from codex_ml.training import engine

    bench = load_bench()
    p = params(train=dict(max_steps=7, eval_every=1000, save_every=1000))
    n = 10  # 2 batches of 4 per epoch (2 left over): 7 steps span 4 epochs
    blocks = torch.randint(0, 200, (n, 32))
    blocks[:, 0] = torch.arange(n)  # each block's first token names it
    model = modeling.build(p.model, modeling.load_tokenizer(workspace / "models" / "tokenizer"), 32)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"][:, 0].tolist()) if m.training else None,
        with_kwargs=True)
    engine.train(model, blocks, blocks[:4], p.train, seed=p.seed, out_dir=tmp_path)
    want = bench.engine_batches(n, p.train.batch_size, p.seed)
    assert seen == [[int(i) for i in next(want)] for _ in range(7)]


def test_the_profiles_communication_measure_counts_only_time_nothing_else_runs():
    b = load_bench()
    comm = b.merged([(0, 10), (5, 20), (40, 50)])  # NCCL kernels on their own stream
    work = b.merged([(2, 8), (15, 45), (45, 46)])  # compute kernels
    assert comm == [(0, 20), (40, 50)] and work == [(2, 8), (15, 46)]
    assert b.overlap(comm, work) == [(2, 8), (15, 20), (40, 46)]
    assert b.length(comm) - b.length(b.overlap(comm, work)) == 30 - 17  # 0-2, 8-15, 46-50


def test_smi_summary_reads_nvidia_smis_csv_per_run_and_gpu_while_busy(tmp_path):
    """bench/smi_summary.py on nvidia-smi's own CSV format (units in the header and the values, the
    event reasons as hex): samples are split by the marks, idle ones (compiling, loading) left out,
    and the power-cap and thermal bits read from the reasons."""
    head = ("timestamp, index, clocks.current.sm [MHz], clocks.current.memory [MHz], power.draw [W], "
            "power.limit [W], temperature.gpu, temperature.memory, utilization.gpu [%], "
            "clocks_event_reasons.active\n")
    rows = [  # time, gpu, SM MHz, W, utilization %, reasons
        ("14:00:01.000", 0, 1980, 80.0, 0, "0x0000000000000001"),  # idle: left out
        ("14:00:02.000", 0, 1600, 690.0, 100, "0x0000000000000004"),
        ("14:00:02.500", 0, 1500, 695.0, 100, "0x0000000000000000"),
        ("14:00:03.000", 1, 1700, 688.0, 99, "0x0000000000000024"),  # power cap + SW thermal
        ("14:00:06.000", 0, 1400, 699.0, 100, "0x0000000000000004"),  # the second run
    ]
    (tmp_path / "smi.csv").write_text(head + "".join(
        f"2026/11/30 {t}, {g}, {mhz} MHz, 3201 MHz, {w:.2f} W, 700.00 W, 60, 55, {u} %, {r}\n"
        for t, g, mhz, w, u, r in rows))
    (tmp_path / "marks.txt").write_text("14:00:00.000 one\n14:00:05.000 two\n14:00:09.000 end\n")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "smi_summary.py"), str(tmp_path / "smi.csv"),
                          str(tmp_path / "marks.txt")], capture_output=True, text=True, check=True).stdout
    lines = [line.split() for line in out.splitlines()]
    cols = lines[0]
    got = {(r[0], int(r[1])): dict(zip(cols[2:], map(float, r[2:]))) for r in lines[1:]}
    assert set(got) == {("one", 0), ("one", 1), ("two", 0)}
    assert got["one", 0]["busy_samples"] == 2 and got["one", 0]["sm_mhz_median"] == 1550
    assert got["one", 0]["power_cap"] == 0.5 and got["one", 0]["sw_thermal"] == 0
    assert got["one", 1]["power_cap"] == 1 and got["one", 1]["sw_thermal"] == 1
    assert got["two", 0]["sm_mhz_min"] == 1400 and got["two", 0]["power_w_median"] == 699
