"""The train_model stage's work: tokenizer + data → model → engine → models/model + metrics."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import io, modeling
from ..data import tokens
from ..params import Params
from ..stage import UserError
from ..tokenizer import fim_ids
from . import checkpoints, engine, fim, provenance, trackers, transforms

log = logging.getLogger("codex.train")

# Train keys that change how a run is observed or stored, never the weights it produces.
# The engine's levers change rounding only; report_to where curves also go.
_OPERATIONAL = {"log_every", "save_every", "keep_checkpoints", "num_workers", "devices",
                "ddp_bucket_mb", "engine", "report_to"}
# The checkpoint layout (engine.save_checkpoint) and the data order (engine.Order): a checkpoint
# made with another layout or order is never resumed. Bump it when either changes.
CHECKPOINT_FORMAT = "codex-loop-3"


@dataclass(frozen=True)
class Paths:
    tokens: Path = Path("data/tokens")
    tokenizer: Path = Path("models/tokenizer")
    out: Path = Path("models/model")
    checkpoints: Path = Path("models/checkpoints")
    live: Path = Path("metrics/train")
    lock: Path = Path("requirements.lock")


def fingerprint_of(p: Params, manifest: dict, tok_hash: str) -> str:
    return checkpoints.fingerprint(
        seed=p.seed, model=p.model.model_dump(), tokenizer=p.tokenizer.model_dump(),
        train=p.train.model_dump(exclude=_OPERATIONAL),
        data=manifest.get("dataset_version") or io.sha256_text(json.dumps(manifest, sort_keys=True)),
        tokenizer_files=tok_hash, format=CHECKPOINT_FORMAT)


def visible_devices(devices) -> int:
    n = torch.cuda.device_count()
    if devices == "auto":
        return max(n, 1)
    if n and devices > n:
        raise UserError(f"train.devices = {devices} but only {n} GPU(s) are visible")
    return devices if n else 1


def trim_curves(live: Path, step: int) -> None:
    """A resumed run continues the interrupted run's curves from its checkpoint's step. Rows logged
    after that step (between the checkpoint and the kill) would appear twice: drop them."""
    for f in (live / "plots" / "metrics").rglob("*.tsv"):
        lines = f.read_text().splitlines(keepends=True)
        head = lines[0].rstrip("\n").split("\t") if lines else []
        if "step" not in head:
            continue
        col = head.index("step")
        keep = lines[:1] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        if len(keep) < len(lines):
            io.write_atomic(f, "".join(keep))


def grow_embeddings(model, tokenizer, p: Params) -> None:
    """A pretrained base whose tokenizer got the FIM sentinels added (tokenizer.ensure_fim_tokens)
    needs embedding rows for them: resized here (transformers initialises the new rows from the
    old ones' mean and covariance, drawn from the seeded generator). Under LoRA the embeddings are
    frozen, so FIM would train on sentinels the model cannot learn: refused."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= rows:
        return
    if p.model.lora.enabled and p.train.fim.rate > 0:
        raise UserError(f"train.fim.rate = {p.train.fim.rate} with model.lora.enabled: the base "
                        f"{p.model.base!r} has no FIM sentinels, and LoRA cannot train the new "
                        "embedding rows; set train.fim.rate: 0, use a base that has them, or "
                        "fine-tune fully (model.lora.enabled: false)")
    log.info("embeddings grown from %d to %d rows for the added FIM sentinels", rows, len(tokenizer))
    model.resize_token_embeddings(len(tokenizer))


def run(p: Params, paths: Paths = Paths()) -> dict:
    t0 = time.perf_counter()
    rank, ws = engine.world()
    manifest = tokens.read_manifest(paths.tokens)
    m, t = p.model, p.train

    # With init: pretrained, train_tokenizer has copied the base model's own tokenizer here.
    tokenizer = modeling.load_tokenizer(paths.tokenizer, m.trust_remote_code)
    tok_hash = tokens.tokenizer_hash(paths.tokenizer)
    if manifest.get("tokenizer_sha256") != tok_hash:
        raise UserError(f"{paths.tokens} was made with another tokenizer than {paths.tokenizer}; "
                        "rerun the tokenize stage (dvc repro tokenize)")
    fp = fingerprint_of(p, manifest, tok_hash)

    train_blocks = tokens.TokenBlocks(paths.tokens, "train", t.block_size, manifest)
    val_blocks = tokens.TokenBlocks(paths.tokens, "val", t.block_size, manifest)
    log.info("%d train / %d val blocks of %d tokens, memory-mapped from %s", len(train_blocks),
             len(val_blocks), t.block_size, paths.tokens)
    engine.check_data(train_blocks, val_blocks, t)  # before dvclive clears the previous curves
    # FIM reorders training documents only; val blocks stay left-to-right, so val loss compares
    # with runs at rate 0. At rate 0 these are the plain blocks: the same batches as before FIM.
    train_blocks = fim.wrap(train_blocks, tokenizer, t.fim, p.seed)

    torch.manual_seed(p.seed)  # scratch init is drawn from the seed
    model = modeling.build(m, tokenizer, t.block_size)
    grow_embeddings(model, tokenizer, p)
    if m.lora.enabled:
        model = modeling.apply_lora(model, m.lora)
    total, trainable = modeling.count_params(model)
    # Settings the model cannot take fail here, before dvclive clears the previous curves.
    if m.lora.enabled and t.distributed == "fsdp" and ws > 1:
        raise UserError("train.distributed = fsdp with model.lora.enabled: not supported (the "
                        "adapter is saved from whole weights; LoRA's frozen base needs no "
                        "sharding of optimizer state); use train.distributed: ddp")
    transforms.resolve(t, model, sharded=engine.sharded(t))
    trackers.check(t.report_to)

    resume_from = None
    if rank == 0:
        resume_from = checkpoints.find_resumable(paths.checkpoints, fp)
    if ws > 1:  # everyone resumes from what rank 0 chose (it may have removed stale ones)
        import torch.distributed as dist
        if not dist.is_initialized():
            if torch.cuda.is_available():
                # One GPU per rank before NCCL starts; otherwise every rank sits on cuda:0 and
                # NCCL refuses the collective ("invalid usage"), as seen on 2 x H200.
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        box = [str(resume_from) if resume_from else None]
        dist.broadcast_object_list(box, src=0)
        resume_from = box[0]

    live = None
    if rank == 0:
        if resume_from:  # the interrupted run's curves go on from its checkpoint
            trim_curves(paths.live, checkpoints.step_of(resume_from))
        else:  # a fresh run's start over, with dvclive or without (the old ones are not this run's)
            shutil.rmtree(paths.live, ignore_errors=True)
        try:
            from dvclive import Live
            live = Live(str(paths.live), dvcyaml=False, save_dvc_exp=False,
                        resume=bool(resume_from))
        except ImportError as e:  # an environment not built from requirements.lock (dvc missing)
            log.warning("dvclive unavailable (%s): training without live metrics", e)
    if live is not None:
        if not torch.cuda.is_available():
            # With pynvml installed but no driver, dvclive's sampler fails before it records the
            # CPU/RAM figures too; tell it there is no GPU.
            import dvclive.monitor_system as ms
            ms.GPU_AVAILABLE = False
        live.monitor_system(interval=0.1, num_samples=20)  # one averaged sample every ~2 s

    try:
        trained = engine.train(model, train_blocks, val_blocks, t, seed=p.seed,
                               out_dir=paths.checkpoints, fingerprint=fp,
                               resume_from=resume_from, live=live)
    finally:
        # dvclive's system monitor is a non-daemon thread: unless ended it keeps the process alive
        # after an error.
        if live is not None:
            live.end()
    res = trained.result
    metrics = {
        "final_train_loss": res.final_train_loss, "final_val_loss": res.final_val_loss,
        "best_val_loss": res.best_val_loss, "steps": res.steps, "tokens": res.tokens,
        "tokens_per_s": res.tokens_per_s, "steady_tokens_per_s": res.steady_tokens_per_s,
        "train_wall_s": res.wall_s,
        "params": total, "trainable_params": trainable, "resumed_from_step": res.start_step,
        "stopped_early": res.stopped_early, "precision": res.precision, "world_size": ws,
        "compiled": res.compiled, "compile_mode": res.compile_mode,
        "loss": res.loss,
    }
    if rank == 0:  # under FSDP the full state dict, gathered by every rank in engine.train
        save(trained.model, tokenizer, p, manifest, metrics, paths, ws, state_dict=trained.state_dict)
    metrics["wall_s"] = round(time.perf_counter() - t0, 1)
    return metrics


def save(model, tokenizer, p: Params, manifest: dict, metrics: dict, paths: Paths, ws: int,
         state_dict: dict | None = None) -> None:
    prov = provenance.provenance(p.seed, ws, paths.lock)
    # What evaluate reads to know the model was trained to infill (evaluation/infill.py).
    prov["fim"] = {"rate": p.train.fim.rate, "spm_rate": p.train.fim.spm_rate,
                   "sentinels": fim_ids(tokenizer)}
    lora = p.model.lora.enabled
    with io.atomic_dir(paths.out) as d:
        if lora:
            model.save_pretrained(d / "adapter")
            if p.model.lora.merge:
                modeling.merge(model).save_pretrained(d)
            else:  # the adapter at the top: AutoModelForCausalLM loads it through peft
                model.save_pretrained(d)
        else:
            model.save_pretrained(d, state_dict=state_dict)
        tokenizer.save_pretrained(d)
        io.write_json(d / "provenance.json", prov)
        params = {"seed": p.seed, "model": p.model.model_dump(), "train": p.train.model_dump(),
                  "tokenizer": p.tokenizer.model_dump()}
        io.write_atomic(d / "README.md", provenance.model_card(
            params=params, manifest=manifest, metrics=metrics, prov=prov, lora=lora))
