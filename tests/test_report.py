"""report: renders every section from real (tiny) inputs, degrades to "not available", compares
with committed metrics in the right direction, and stays offline."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codex_ml import io
from codex_ml.evaluation.pipeline import doc_scores, evaluate_model, load_model
from codex_ml.report.build import build, comparison_section, direction
from codex_ml.report.inputs import Paths, gather

sys.path.insert(0, str(Path(__file__).parent))
from test_evaluation import build_tiny_model, one_thread, stdlib_texts, tiny_params, write_split  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["## Data", "## Tokenizer", "## Training", "## Evaluation", "## Sample completions",
            "## Provenance", "## Comparison with the last commit"]


def paths(root: Path) -> Paths:
    m = root / "metrics"
    return Paths(ingest=m / "ingest.json", sanitize=m / "sanitize.json", split=m / "split.json",
                 manifest=root / "data/splits/manifest.json", tokenizer=m / "tokenizer.json",
                 train=m / "train.json", train_live=m / "train", eval=m / "eval.json",
                 eval_dir=root / "data/eval", provenance=root / "models/model/provenance.json",
                 eval_docs=m / "eval_docs.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run's outputs in the layout the stages write: evaluate and dvclive for real; the data
    and tokenizer metrics in the shapes ingest/sanitize/split/train_tokenizer write."""
    from dvclive import Live

    root = tmp_path_factory.mktemp("run")
    m = root / "metrics"
    m.mkdir()
    texts = stdlib_texts(5)
    model_dir = build_tiny_model(root / "models" / "model")
    splits = write_split(root / "data" / "splits", texts)
    io.write_json(splits / "manifest.json", {"dataset_version": "abc123", "splits": {
        "test": {"documents": 5, "bytes": sum(len(t.encode()) for t in texts)}}})
    io.write_json(m / "ingest.json", {"documents": 7, "bytes": 20000,
                                      "skipped": {"empty": 1, "binary": 0}, "sources": {}})
    io.write_json(m / "sanitize.json", {"docs_in": 7, "docs_out": 6, "bytes_out": 19000,
                                        "dropped": {"duplicate": 1, "too_short": 0},
                                        "redactions": {"email": 2, "jwt": 0}, "docs_redacted": 1,
                                        "redactions_total": 2})
    io.write_json(m / "split.json", {"dataset_version": "abc123", "train": {"documents": 1, "bytes": 9},
                                     "test": {"documents": 5, "bytes": 10000}})
    io.write_json(m / "tokenizer.json", {"source": "trained", "vocab_size": 400,
                                         "test_bytes_per_token": 2.1, "roundtrip_exact": 1.0})
    io.write_json(m / "train.json", {"steps": 3, "tokens": 768, "tokens_per_s": 900.0,
                                     "best_val_loss": 5.9, "final_train_loss": 5.8})
    io.write_json(model_dir / "provenance.json", {"git": {"commit": "deadbeef", "dirty": False},
                                                   "torch": "2.13.0", "seed": 7})
    live = Live(str(m / "train"), dvcyaml=False, save_dvc_exp=False)
    for step in range(1, 4):
        live.step = step
        live.log_metric("loss", 6.0 - step * 0.1)  # the names transformers' DVCLiveCallback uses
        live.log_metric("learning_rate", 1e-3 * step)
        live.log_metric("tokens_per_s", 900.0)
        live.log_metric("eval/loss", 6.05 - step * 0.1)
    live.end()
    model, tok = load_model(model_dir)
    (root / "data" / "eval").mkdir()
    io.write_json(m / "eval.json", evaluate_model(model, tok, splits, root / "data" / "eval", tiny_params()))
    io.write_json(m / "eval_docs.json", doc_scores(root / "data" / "eval"))  # as stages/evaluate.py does
    return root


def test_report_renders_all_sections(run_dir, tmp_path):
    committed = json.loads((run_dir / "metrics/eval.json").read_text())
    committed["bits_per_byte"]["value"] += 1.0  # the "last commit" was worse
    ctx = gather(paths(run_dir), "HEAD", num_samples=2)
    ctx["committed"] = {"eval": committed, "train": None, "tokenizer": None}
    info = build(ctx, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert all(s in md for s in SECTIONS)
    assert all(info["sections_available"].values()), info
    assert info["not_available"] == 0, md
    assert info["figures"] == ["bits_per_byte.png", "per_document.png", "training.png"]
    assert "abc123" in md and "| email | 2 |" in md and "| duplicate | 1 |" in md
    assert "gzip -9" in md and "95% CI" in md and md.count("Prompt (last lines)") == 2
    assert re.search(r"eval: bits_per_byte ↓ \| [\d.]+ \| [\d.]+ \| -1 .*\*\*better\*\*", md), md
    html = (tmp_path / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3  # figures embedded: one file, offline
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from a network
    assert "<table>" in html and "<h2>Evaluation</h2>" in html


def test_report_does_not_plot_another_runs_curves(run_dir, tmp_path):
    """The curves end at step 3; a model said to have trained 1,289 steps did not make them."""
    ctx = gather(paths(run_dir), "HEAD", num_samples=0)
    ctx["train"] = {**ctx["train"], "steps": 1289}
    info = build(ctx, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "training.png" not in info["figures"]
    assert "end at step 3, but this model trained 1,289 steps: not this run's" in md


def test_report_without_inputs_says_not_available(tmp_path):
    ctx = gather(paths(tmp_path / "nothing"), "no-such-ref", num_samples=3)
    info = build(ctx, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert all(s in md for s in SECTIONS)
    assert not any(info["sections_available"].values())
    assert info["figures"] == [] and md.count("_not available_") >= 8


def test_change_direction():
    assert direction("bits_per_byte.value") is False and direction("loss.value") is False
    assert direction("top5_accuracy.value") is True and direction("completion.chrf") is True
    assert direction("tokens_per_s") is True and direction("baselines.gzip_bits_per_byte.value") is None
    assert direction("docs") is None
    ctx = {"compare_to": "HEAD", "eval": {"top1_accuracy": {"value": 0.30}, "loss": {"value": 2.0},
                                          "docs": 21},
           "committed": {"eval": {"top1_accuracy": {"value": 0.25}, "loss": {"value": 1.9}, "docs": 20}}}
    md = comparison_section(ctx)
    assert re.search(r"top1_accuracy ↑ .*\*\*better\*\*", md)
    assert re.search(r"loss ↓ .*\*\*worse\*\*", md)
    assert re.search(r"eval: docs \|.*changed", md)


@pytest.mark.slow
def test_stage_script_in_git_repo(run_dir, tmp_path):
    """The stage from the command line: compares with metrics committed at HEAD of a real repo."""
    repo = tmp_path / "repo"
    import shutil

    shutil.copytree(run_dir, repo)
    (repo / "params.yaml").write_text("report: {num_samples: 1}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:1] + ["init", "-q"], cwd=repo, check=True)
    subprocess.run(git + ["add", "metrics"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-qm", "m"], cwd=repo, check=True)
    ev = json.loads((repo / "metrics/eval.json").read_text())
    ev["top5_accuracy"]["value"] -= 0.01
    io.write_json(repo / "metrics/eval.json", ev)
    docs = json.loads((repo / "metrics/eval_docs.json").read_text())
    docs["docs"]["nll_bits"] = [b * 0.9 for b in docs["docs"]["nll_bits"]]  # every document easier now
    io.write_json(repo / "metrics/eval_docs.json", docs)
    r = subprocess.run([sys.executable, str(ROOT / "stages/report.py")], cwd=repo, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    md = (repo / "reports/report.md").read_text()
    assert re.search(r"eval: top5_accuracy ↑ .*\*\*worse\*\*", md)
    assert re.search(r"eval: top1_accuracy ↑ .*\| same \|", md)
    assert re.search(r"bits per byte: better, difference now - `HEAD` -\d\.\d+, 95% CI \[-.*over 5 documents", md)
