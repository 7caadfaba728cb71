"""End-to-end: the data stages under real `dvc repro` in a throwaway git repository."""

import json

import pytest

from pipeline_utils import dvc, make_repo, ran_stages, set_params

pytestmark = pytest.mark.slow


def test_data_stages_rerun_only_what_changed(tmp_path):
    repo = make_repo(tmp_path)
    out = dvc(repo, "repro", "split").stdout
    assert ran_stages(out) == ["ingest", "sanitize", "split"]
    manifest = json.loads((repo / "data/splits/manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] > 50
    for f in ["metrics/ingest.json", "metrics/sanitize.json", "metrics/split.json"]:
        assert (repo / f).exists()
    # Nothing changed: nothing runs, and dvc status agrees.
    assert ran_stages(dvc(repo, "repro", "split").stdout) == []
    assert "up to date" in dvc(repo, "status", "split").stdout.lower()
    # A sanitize param: sanitize and split rerun, ingest does not.
    set_params(repo, {"sanitize": {"min_chars": 2000}})
    assert ran_stages(dvc(repo, "repro", "split").stdout) == ["sanitize", "split"]
    # A train param: no data stage reruns.
    set_params(repo, {"train": {"lr": 0.001}})
    assert ran_stages(dvc(repo, "repro", "split").stdout) == []
    # A code change reruns exactly the stages that import it.
    (repo / "codex_ml/data/split.py").write_text(
        (repo / "codex_ml/data/split.py").read_text() + "\n# touched\n")
    assert ran_stages(dvc(repo, "repro", "split").stdout) == ["split"]
    # Metrics are visible to dvc without flags.
    shown = dvc(repo, "metrics", "show", "--json").stdout
    assert "dataset_version" in shown and "redactions_total" in shown
