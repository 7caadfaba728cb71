"""Stage report: reports/report.md and reports/report.html (self-contained) with figures/, from the
metric files of every stage, compared with the last committed metrics (report.compare_to)."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import io, params  # noqa: E402
from codex_ml.report.build import build  # noqa: E402
from codex_ml.report.inputs import Paths, gather  # noqa: E402
from codex_ml.stage import run  # noqa: E402

log = logging.getLogger("codex.report")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports")
    a = ap.parse_args()
    p = params.load(a.params)
    ctx = gather(Paths(), p.report.compare_to, p.report.num_samples)
    with io.atomic_dir(a.out) as tmp:
        info = build(ctx, tmp)
    missing = [k for k, v in info["sections_available"].items() if not v]
    log.info("report: %s/report.html and report.md, %d figures%s", a.out, len(info["figures"]),
             f"; not available: {', '.join(missing)}" if missing else "")


if __name__ == "__main__":
    run(main)
