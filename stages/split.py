"""split: assign data/sanitized documents to data/splits/{train,val,test} and write manifest.json."""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import params  # noqa: E402
from codex_ml.data.engine import Engine  # noqa: E402
from codex_ml.data.split import SPLITS, split  # noqa: E402
from codex_ml.io import atomic_dir, write_json  # noqa: E402
from codex_ml.stage import run  # noqa: E402

log = logging.getLogger("codex.split")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--input", default="data/sanitized")
    ap.add_argument("--output", default="data/splits")
    ap.add_argument("--metrics", default="metrics/split.json")
    args = ap.parse_args()
    p = params.load(args.params)
    t0 = time.perf_counter()
    with atomic_dir(args.output) as tmp:
        manifest = split(Path(args.input), tmp, p.split, p.seed, p.ingest.shard_bytes,
                         Engine(p.data.engine, p.data.workers, p.data.ray_address))
        write_json(tmp / "manifest.json", manifest)
    sp = manifest["splits"]
    write_json(args.metrics, {
        "dataset_version": manifest["dataset_version"],
        **{s: {"documents": sp[s]["documents"], "bytes": sp[s]["bytes"]} for s in SPLITS},
        **({"leakage": manifest["leakage"]} if "leakage" in manifest else {}),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    log.info("split %s: %s", manifest["dataset_version"],
             ", ".join(f"{s} {sp[s]['documents']} docs / {sp[s]['bytes'] / 1e6:.2f} MB" for s in SPLITS))


if __name__ == "__main__":
    run(main)
