"""tokenize: data/splits/{train,val,test} → data/tokens/ token shards (flat .bin + .idx, manifest.json)
with models/tokenizer, once, for train_model to memory-map. See codex_ml/data/tokens.py.

(Not stages/tokenize.py: on sys.path as the script's folder, that name would shadow the standard
library's tokenize module, which logging imports, in every stage.)"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import params  # noqa: E402
from codex_ml.data.engine import Engine  # noqa: E402
from codex_ml.data.tokens import tokenize  # noqa: E402
from codex_ml.io import write_json  # noqa: E402
from codex_ml.stage import run  # noqa: E402

log = logging.getLogger("codex.tokenize")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--output", default="data/tokens")
    ap.add_argument("--metrics", default="metrics/tokenize.json")
    args = ap.parse_args()
    p = params.load(args.params)
    with Engine(p.data.engine, p.data.workers, p.data.ray_address) as engine:
        m = tokenize(args.splits, args.tokenizer, args.output, p.tokenize.shard_tokens, engine)
    write_json(args.metrics, m)
    log.info("tokenize: %s; %s tokens in %.1f s (%.1f MB/s, %s) -> %s",
             ", ".join(f"{s} {m[s]['documents']} docs / {m[s]['tokens']:,} tokens" for s in
                       ("train", "val", "test")),
             f"{sum(m[s]['tokens'] for s in ('train', 'val', 'test')):,}", m["seconds"],
             m["mb_per_s"], m["engine"], args.output)


if __name__ == "__main__":
    run(main)
