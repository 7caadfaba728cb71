"""ingest: read the sources in params.yaml `ingest` into data/raw/docs*.parquet."""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import params  # noqa: E402
from codex_ml.data.engine import Engine  # noqa: E402
from codex_ml.data.ingest import check_sources, ingest  # noqa: E402
from codex_ml.io import atomic_dir, write_json  # noqa: E402
from codex_ml.stage import UserError, run  # noqa: E402

log = logging.getLogger("codex.ingest")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--output", default="data/raw")
    ap.add_argument("--metrics", default="metrics/ingest.json")
    args = ap.parse_args()
    p = params.load(args.params)
    check_sources(p.ingest)
    t0 = time.perf_counter()
    with atomic_dir(args.output) as tmp, \
            Engine(p.data.engine, p.data.workers, p.data.ray_address) as engine:
        m = ingest(p.ingest, tmp, engine)
        if m["documents"] == 0:
            raise UserError(f"ingest produced no documents (skipped: {m['skipped']}); "
                            "check ingest.sources paths and include/exclude globs")
    m["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(args.metrics, m)
    log.info("ingest: %d documents, %.1f MB, %d skipped, %.1fs -> %s", m["documents"],
             m["bytes"] / 1e6, sum(m["skipped"].values()), m["seconds"], args.output)


if __name__ == "__main__":
    run(main)
