"""Deterministic train/val/test assignment and the dataset manifest."""

from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path

from ..io import ShardWriter, iter_rows, sha256_file, sha256_text
from ..params import Split
from ..stage import UserError

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


def split(in_dir: Path, out_dir: Path, cfg: Split, seed: int, shard_bytes: int) -> dict:
    """Write out_dir/{train,val,test}*.parquet and manifest.json; return the manifest."""
    writers = {s: ShardWriter(out_dir, s, shard_bytes) for s in SPLITS}
    ids = {s: [] for s in SPLITS}
    nbytes = dict.fromkeys(SPLITS, 0)
    for doc in iter_rows(in_dir, "docs"):
        s = assign(group_key(doc, cfg), seed, cfg)
        writers[s].add(doc)
        ids[s].append(doc["id"])
        nbytes[s] += doc["bytes"]
    total = sum(len(v) for v in ids.values())
    for s in SPLITS:
        if not ids[s]:
            raise UserError(f"split '{s}' would be empty ({total} documents, split.fractions "
                            f"{cfg.fractions.model_dump()}); add documents or raise "
                            f"split.fractions.{s}")
    files = {s: writers[s].close() for s in SPLITS}
    manifest = {
        "params": {"seed": seed, **cfg.model_dump()},
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
    return manifest
