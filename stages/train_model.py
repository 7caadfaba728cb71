"""train_model: train (or LoRA-tune) the code LM; resumable checkpoints, live metrics, model card.

    python stages/train_model.py            # the DVC stage; resumes models/checkpoints if they match
With several GPUs visible (train.devices: auto or N > 1) it relaunches itself under torchrun;
train.devices: N with more GPUs visible uses the first N.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codex_ml import io, params  # noqa: E402
from codex_ml.stage import run  # noqa: E402

log = logging.getLogger("codex.train_model")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="data/tokens", help="the tokenize stage's shards")
    ap.add_argument("--tokenizer", default="models/tokenizer")
    ap.add_argument("--out", default="models/model")
    ap.add_argument("--checkpoints", default="models/checkpoints")
    ap.add_argument("--metrics", default="metrics/train.json")
    ap.add_argument("--live", default="metrics/train", help="dvclive's directory: the training curves")
    a = ap.parse_args()
    p = params.load()

    import torch

    from codex_ml.training import pipeline

    n = pipeline.visible_devices(p.train.devices)
    seen = torch.cuda.device_count()
    # Settings torch reads once per process, made before any CUDA work and inherited by torchrun's
    # ranks; never over the user's own.
    from codex_ml.training import transforms
    for k, v in transforms.process_env(p.train, sharded=n > 1 and p.train.distributed == "fsdp").items():
        os.environ.setdefault(k, v)
    if (n > 1 or n < seen) and "WORLD_SIZE" not in os.environ:
        if n < seen:
            # train.devices: N runs on the first N GPUs only.
            ids = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(seen)))
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids.split(",")[:n])
        # One process per GPU (rank 0 logs and saves), or this one again on the first GPU.
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
        os.execv(sys.executable, [sys.executable, *launch, *sys.argv])
    paths = pipeline.Paths(tokens=Path(a.tokens), tokenizer=Path(a.tokenizer), out=Path(a.out),
                           checkpoints=Path(a.checkpoints), live=Path(a.live))
    m = pipeline.run(p, paths)
    if int(os.environ.get("RANK", 0)) == 0:
        io.write_json(a.metrics, m)
        log.info("train_model: %d steps, %s tokens, %.0f tokens/s, best val loss %.4f, %.0f s -> %s",
                 m["steps"], f"{m['tokens']:,}", m["tokens_per_s"], m["best_val_loss"], m["wall_s"],
                 a.out)


if __name__ == "__main__":
    run(main)
