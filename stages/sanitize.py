"""sanitize: data/raw → data/sanitized. Quality filters, policy blocks, secret/PII redaction, dedup."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import io, params  # noqa: E402
from codex_ml.data.engine import Engine  # noqa: E402
from codex_ml.safety.sanitize import sanitize_table  # noqa: E402
from codex_ml.stage import run  # noqa: E402

log = logging.getLogger("codex.sanitize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", default="data/raw", help="directory holding docs*.parquet")
    ap.add_argument("--output", default="data/sanitized")
    ap.add_argument("--metrics", default="metrics/sanitize.json")
    ap.add_argument("--params", default=params.PARAMS_FILE)
    args = ap.parse_args()

    p = params.load(args.params)
    engine = Engine(p.data.engine, p.data.workers, p.data.ray_address)
    m = sanitize_table(args.input, args.output, p.sanitize, shard_bytes=p.ingest.shard_bytes,
                       engine=engine)
    io.write_json(args.metrics, m)
    top = ", ".join(f"{k}={v}" for k, v in sorted(m["redactions"].items(), key=lambda kv: -kv[1])
                    if v)[:200]
    log.info("sanitize: %d → %d docs, %.1f → %.1f MB, %d redactions (%s), dropped %s, %.1fs "
             "(%.1f MB/s)", m["docs_in"], m["docs_out"], m["bytes_in"] / 1e6, m["bytes_out"] / 1e6,
             m["redactions_total"], top or "none", {k: v for k, v in m["dropped"].items() if v},
             m["seconds"], m["mb_per_s"])


if __name__ == "__main__":
    run(main)
