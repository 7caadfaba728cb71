"""train_tokenizer: a lossless SentencePiece tokenizer for code from data/splits/train only, exported
as a Hugging Face fast tokenizer (models/tokenizer/), or the base model's own tokenizer when
model.init is pretrained. Writes metrics/tokenizer.json."""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import params  # noqa: E402
from codex_ml.io import write_json  # noqa: E402
from codex_ml.stage import run  # noqa: E402
from codex_ml.tokenizer import train_dir  # noqa: E402

log = logging.getLogger("codex.train_tokenizer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--splits", default="data/splits")
    ap.add_argument("--output", default="models/tokenizer")
    ap.add_argument("--metrics", default="metrics/tokenizer.json")
    args = ap.parse_args()
    p = params.load(args.params)
    m = train_dir(args.splits, args.output, p)
    write_json(args.metrics, m)
    if m["trained"]:
        log.info("tokenizer: vocab %d, %.2f bytes/token on val, %.2f on test, round-trip %.3f, "
                 "HF agreement %.3f, trained in %.1f s", m["vocab_size"], m.get("val_bytes_per_token") or 0,
                 m.get("test_bytes_per_token") or 0, m["roundtrip_exact"] or 0, m["hf_sp_identical"] or 0,
                 m["train_seconds"])
    else:
        log.info("tokenizer: copied from pretrained base %s (vocab %d), not trained",
                 m["base"], m["vocab_size"])


if __name__ == "__main__":
    run(main)
