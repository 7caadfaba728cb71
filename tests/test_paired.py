"""The report's paired comparison with the committed run (codex_ml/report/paired.py) and the
per-document scores the evaluate stage commits for it (metrics/eval_docs.json)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from codex_ml.evaluation.bootstrap import paired_diff_ci
from codex_ml.evaluation.pipeline import doc_scores
from codex_ml.report import paired


def scores(bits, nbytes, ids=None):
    ids = ids or [f"{i:016x}" for i in range(len(bits))]
    return {"docs": {"id": ids, "bytes": list(nbytes), "nll_bits": list(bits)}}


def test_paired_interval_finds_a_small_uniform_gain_that_separate_intervals_would_miss():
    rng = np.random.default_rng(0)
    nbytes = rng.integers(500, 50_000, 40).astype(float)
    old = nbytes * rng.uniform(1.2, 2.6, 40)  # documents differ a lot in difficulty
    new = old - nbytes * 0.02                  # every document 0.02 bits/byte easier
    r = paired_diff_ci(new, old, nbytes, 2000, 0)
    assert abs(r["diff"] + 0.02) < 1e-9 and r["ci_high"] < 0 and r["n"] == 40
    assert r["min_detectable"] < 0.02
    # the unpaired view: the two runs' own intervals overlap widely
    assert paired.bits_per_byte(scores(new, nbytes), scores(old, nbytes), 0)["verdict"] == "better"
    assert paired.bits_per_byte(scores(old, nbytes), scores(new, nbytes), 0)["verdict"] == "worse"


def test_noise_alone_is_no_detectable_difference():
    rng = np.random.default_rng(1)
    nbytes = rng.integers(500, 5000, 30).astype(float)
    old = nbytes * 1.8
    new = old + nbytes * rng.normal(0, 0.05, 30)
    r = paired.bits_per_byte(scores(new, nbytes), scores(old, nbytes), 0)
    assert r["verdict"] == "no detectable difference" and r["ci_low"] < 0 < r["ci_high"]
    text = paired.section(scores(new, nbytes), scores(old, nbytes), "HEAD", 0)
    assert "no detectable difference" in text and "over 30 documents" in text
    assert "detects differences of about" in text


def test_only_the_same_documents_are_paired():
    a = scores([10.0, 20.0, 30.0], [10, 10, 10], ["a", "b", "c"])
    b = scores([11.0, 21.0, 99.0, 5.0], [10, 10, 12, 10], ["a", "b", "c", "d"])  # c changed bytes
    r = paired.bits_per_byte(a, b, 0)
    assert r["n"] == 2 and r["of"] == 3 and abs(r["diff"] + 0.1) < 1e-9
    assert "(2 of 3 shared)" in paired.section(a, b, "v1", 0)
    none = paired.section(a, scores([1.0], [1], ["z"]), "v1", 0)
    assert "only 0 of 3 documents shared" in none
    assert "not available" in paired.section(a, None, "HEAD", 0)


def test_pass_at_1_is_paired_over_problems():
    old = {"humaneval": {f"p{i}": [0, 10] for i in range(20)}}
    new = {"humaneval": {f"p{i}": [5, 10] for i in range(20)}}
    r = paired.pass_at_1(new, old, 0)
    assert r["diff"] == 0.5 and r["verdict"] == "better"
    assert "HumanEval pass@1: better" in paired.section(new, old, "HEAD", 0)


def test_doc_scores_from_the_evaluate_outputs(tmp_path):
    pq.write_table(pa.table({"id": ["ab" * 32, "cd" * 32], "bytes": [100, 200],
                             "nll_bits": [150.123456, 300.5], "top1": [1, 2]}), tmp_path / "docs.parquet")
    with open(tmp_path / "humaneval.jsonl", "w") as f:
        for prob, ok in (("HumanEval/0", True), ("HumanEval/0", False), ("HumanEval/1", False)):
            f.write(json.dumps({"problem": prob, "passed": ok}) + "\n")
    s = doc_scores(tmp_path)
    assert s == {"docs": {"id": ["ab" * 8, "cd" * 8], "bytes": [100, 200], "nll_bits": [150.1235, 300.5]},
                 "humaneval": {"HumanEval/0": [1, 2], "HumanEval/1": [0, 1]}}
