"""Deterministic train/val/test assignment and the dataset manifest."""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from .. import io
from ..io import ShardWriter, sha256_file, sha256_text
from ..params import Split
from ..stage import UserError
from .engine import Engine, cached

SPLITS = ("train", "val", "test")


def assign(key: str, seed: int, cfg: Split) -> str:
    """A document's split depends only on its key and the seed, so adding documents never moves
    existing ones between splits."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    f = cfg.fractions
    if u < f.train:
        return "train"
    return "val" if u < f.train + f.val else "test"


def group_key(doc: dict, cfg: Split) -> str:
    if cfg.group_by == "directory":
        return f"{doc['source']}:{posixpath.dirname(doc['path'])}"
    return doc["id"]


def split_unit(shared: tuple[Split, int], unit: tuple[str, int]) -> dict:
    """One row group's documents by split: {split: (table, ids)}. Runs in the engine's workers."""
    cfg, seed = shared
    table = io.read_row_group(unit, io.DOC_SCHEMA.names)
    cols = table.select(["id", "source", "path"]).to_pydict()
    where = [assign(group_key(dict(zip(cols, vals)), cfg), seed, cfg)
             for vals in zip(*cols.values())]
    out = {}
    for s in SPLITS:
        mask = pa.array([w == s for w in where], type=pa.bool_())
        part = table.filter(mask)
        sigs = []
        if cfg.leakage.enabled and s != "val":
            near = cached(_near, cfg.leakage.threshold, cfg.leakage.num_perm, cfg.leakage.shingle_size)
            sigs = [near.bands(near.signature(t)) for t in part.column("text").to_pylist()]
        out[s] = (part, part.column("id").to_pylist(), sigs)
    return out


def _near(threshold: float, num_perm: int, shingle_size: int):
    from ..safety.filters import NearDedup

    return NearDedup(threshold, num_perm, shingle_size)


def split(in_dir: Path, out_dir: Path, cfg: Split, seed: int, shard_bytes: int,
          engine: Engine | None = None) -> dict:
    """Write out_dir/{train,val,test}*.parquet and manifest.json; return the manifest."""
    writers = {s: ShardWriter(out_dir, s, shard_bytes) for s in SPLITS}
    ids = {s: [] for s in SPLITS}
    nbytes = dict.fromkeys(SPLITS, 0)
    units = io.row_groups(in_dir, "docs")
    lk = cfg.leakage
    # Only the band keys are kept (8 bytes a band, 8 bands at the defaults): a test document is
    # leaked when one of its bands equals the same band of a train document, as an LSH query.
    bands = {"train": [], "test": []}
    with engine or Engine(workers=1) as eng:
        for parts in eng.map(split_unit, units, (cfg, seed)):
            for s, (table, part_ids, sigs) in parts.items():
                writers[s].add_table(table)
                ids[s] += part_ids
                nbytes[s] += pa.compute.sum(table.column("bytes")).as_py() or 0
                if sigs:
                    bands[s].append(np.stack(sigs))
    total = sum(len(v) for v in ids.values())
    for s in SPLITS:
        if not ids[s]:
            raise UserError(f"split '{s}' would be empty ({total} documents, split.fractions "
                            f"{cfg.fractions.model_dump()}); add documents or raise "
                            f"split.fractions.{s}")
    files = {s: writers[s].close() for s in SPLITS}
    manifest = {
        "params": {"seed": seed, **cfg.model_dump(exclude={"leakage"})},
        "splits": {
            s: {
                "documents": len(ids[s]),
                "bytes": nbytes[s],
                "ids_sha256": sha256_text("\n".join(sorted(ids[s]))),
                "files": {f.name: sha256_file(f) for f in files[s]},
            }
            for s in SPLITS
        },
    }
    # The version hashes content (ids) and assignment params, not file bytes, so a re-encoded but
    # identical dataset keeps its version.
    canon = json.dumps({"params": manifest["params"],
                        "ids": {s: manifest["splits"][s]["ids_sha256"] for s in SPLITS}},
                       sort_keys=True)
    manifest["dataset_version"] = sha256_text(canon)[:16]
    if lk.enabled:
        train, test = (np.concatenate(bands[s]) if bands[s] else np.zeros((0, 1), np.uint64)
                       for s in ("train", "test"))
        hit = np.zeros(len(test), dtype=bool)
        for j in range(test.shape[1] if len(train) else 0):
            hit |= np.isin(test[:, j], train[:, j])
        leaked = int(hit.sum())
        manifest["leakage"] = {"test_documents": len(test),
                               "with_near_duplicate_in_train": leaked,
                               "share": round(leaked / max(len(test), 1), 4),
                               **lk.model_dump(exclude={"enabled"})}
    return manifest
