"""Sanitize a document table: quality filters, policy blocks, redaction, exact and near dedup."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from .. import io
from ..params import Sanitize
from .filters import ExactDedup, NearDedup, quality_reason
from .policy import build_rules, load_policy
from ..stage import UserError
from .redact import Redactor

QUALITY_REASONS = ("too_short", "long_line", "low_alnum")


class Sanitizer:
    """Turns raw DOC_SCHEMA rows into sanitized ones (or None) and keeps the counts."""

    def __init__(self, cfg: Sanitize):
        self.cfg = cfg
        policy = load_policy(cfg.policy)
        self.rules = build_rules(policy, cfg.redact_pii, where=f"policy file {cfg.policy}")
        self.redactor = Redactor(self.rules)
        self.exact = ExactDedup() if cfg.dedup else None
        nd = cfg.near_dup
        # A fixed MinHash seed: the output depends on sanitize params only, not on the global seed.
        self.near = NearDedup(nd.threshold, nd.num_perm, nd.shingle_size) if nd.enabled else None
        # Every key present from the start, so `dvc metrics diff` compares like with like.
        self.redactions = Counter({r.id: 0 for r in self.redactor.redact})
        self.dropped = Counter({k: 0 for k in QUALITY_REASONS})
        self.dropped.update({f"policy:{r.id}": 0 for r in self.redactor.block})
        if self.exact:
            self.dropped["duplicate"] = 0
        if self.near:
            self.dropped["near_duplicate"] = 0
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = self.docs_redacted = 0

    def __call__(self, row: dict) -> dict | None:
        text = row["text"] or ""
        self.docs_in += 1
        self.bytes_in += row["bytes"] if row.get("bytes") is not None else len(text.encode())
        c = self.cfg
        reason = quality_reason(text, c.min_chars, c.max_line_length, c.min_alnum_fraction)
        if reason is None:
            res = self.redactor(text)
            text = res.text
            if res.blocked_by:
                reason = f"policy:{res.blocked_by}"
            elif self.exact and self.exact.is_duplicate(text):
                reason = "duplicate"
            elif self.near and self.near.is_duplicate(text):
                reason = "near_duplicate"
        if reason:
            self.dropped[reason] += 1
            return None
        if res.counts:
            self.redactions.update(res.counts)
            self.docs_redacted += 1
        nbytes = len(text.encode("utf-8"))
        self.docs_out += 1
        self.bytes_out += nbytes
        return {**row, "id": io.sha256_text(text), "text": text, "bytes": nbytes}

    def metrics(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "docs_redacted": self.docs_redacted,
                "redactions_total": sum(self.redactions.values()),
                "redactions": dict(sorted(self.redactions.items())),
                "dropped_total": sum(self.dropped.values()),
                "dropped": dict(sorted(self.dropped.items()))}


def sanitize_table(input_dir: str | Path, output_dir: str | Path, cfg: Sanitize,
                   name: str = "docs", batch_size: int = 512,
                   shard_bytes: int = 256 << 20) -> dict:
    """Stream `<input_dir>/<name>*.parquet` through a Sanitizer into `output_dir` atomically."""
    sanitizer = Sanitizer(cfg)
    try:
        total = sum(pq.ParquetFile(p).metadata.num_rows for p in io.shard_paths(input_dir, name))
    except Exception as e:  # pyarrow's errors for a damaged footer vary; any of them means corrupt
        raise UserError(f"corrupt Parquet input in {input_dir}: {str(e).splitlines()[0]}") from None
    t0 = time.perf_counter()
    with io.atomic_dir(output_dir) as tmp:
        writer = io.ShardWriter(tmp, name, shard_bytes=shard_bytes)
        with tqdm(total=total, unit="doc", desc="sanitize", disable=None) as bar:
            for batch in io.iter_batches(input_dir, name, io.DOC_SCHEMA.names, batch_size):
                for row in batch.to_pylist():
                    out = sanitizer(row)
                    if out is not None:
                        writer.add(out)
                bar.update(batch.num_rows)
        if sanitizer.docs_out == 0:
            dropped = {k: v for k, v in sanitizer.dropped.items() if v}
            raise UserError(f"sanitize kept no documents of {sanitizer.docs_in} (dropped: {dropped}); "
                            "loosen sanitize.min_chars / max_line_length / min_alnum_fraction or "
                            "the policy's block rules")
        writer.close()
    m = sanitizer.metrics()
    m["seconds"] = round(time.perf_counter() - t0, 2)
    m["mb_per_s"] = round(m["bytes_in"] / 1e6 / max(m["seconds"], 1e-9), 2)
    return m
