"""Sanitize a document table: quality filters, policy blocks, redaction, exact and near dedup.

The per-document work (filters, redaction, the dedup keys) runs in the data engine's workers, one
Parquet row group at a time; the global decisions (exact and near dedup, first copy kept in input
order) and the writing run in the stage's process, in unit order, so the output is the same
whatever the worker count.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from .. import io
from ..data.engine import Engine, cached
from ..params import Sanitize
from ..stage import UserError
from .decontam import Decontaminator
from .filters import ExactDedup, NearDedup, normalized_digest, quality_reason
from .policy import Policy, build_rules, load_policy
from .redact import Redactor

QUALITY_REASONS = ("too_short", "long_line", "low_alnum")


class Transform:
    """One document's own work: filters, policy blocks and redaction. Returns (reason, None) for a
    dropped document, else (None, the sanitized row, redactions per rule)."""

    def __init__(self, cfg: Sanitize, policy: Policy):
        self.cfg = cfg
        self.redactor = Redactor(build_rules(policy, cfg.redact_pii, where=f"policy file {cfg.policy}"))
        d = cfg.decontaminate
        self.decontam = Decontaminator(tuple(d.benchmarks), d.ngram, d.threshold) if d.enabled else None

    def __call__(self, row: dict) -> tuple[str | None, dict | None, Counter | None]:
        text = row["text"] or ""
        c = self.cfg
        reason = quality_reason(text, c.min_chars, c.max_line_length, c.min_alnum_fraction)
        if reason is None and self.decontam is not None and (hit := self.decontam.match(text)):
            reason = f"benchmark:{hit}"
        if reason:
            return reason, None, None
        res = self.redactor(text)
        if res.blocked_by:
            return f"policy:{res.blocked_by}", None, None
        text = res.text
        return None, {**row, "id": io.sha256_text(text), "text": text,
                      "bytes": len(text.encode("utf-8"))}, res.counts


class Sanitizer:
    """Turns raw DOC_SCHEMA rows into sanitized ones (or None) and keeps the counts."""

    def __init__(self, cfg: Sanitize, policy: Policy | None = None):
        self.cfg = cfg
        self.transform = Transform(cfg, policy if policy is not None else load_policy(cfg.policy))
        self.redactor = self.transform.redactor
        self.exact = ExactDedup() if cfg.dedup else None
        nd = cfg.near_dup
        # A fixed MinHash seed: the output depends on sanitize params only, not on the global seed.
        self.near = NearDedup(nd.threshold, nd.num_perm, nd.shingle_size) if nd.enabled else None
        # Every key present from the start, so `dvc metrics diff` compares like with like.
        self.redactions = Counter({r.id: 0 for r in self.redactor.redact})
        self.dropped = Counter({k: 0 for k in QUALITY_REASONS})
        self.dropped.update({f"policy:{r.id}": 0 for r in self.redactor.block})
        if cfg.decontaminate.enabled:
            self.dropped.update({f"benchmark:{b}": 0 for b in cfg.decontaminate.benchmarks})
        if self.exact:
            self.dropped["duplicate"] = 0
        if self.near:
            self.dropped["near_duplicate"] = 0
        self.docs_in = self.docs_out = self.bytes_in = self.bytes_out = self.docs_redacted = 0

    def count_in(self, nbytes: int) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes

    def admit(self, reason: str | None, nbytes: int, counts: Counter | None,
              digest: bytes | None = None, signature=None) -> bool:
        """The global part: dedup against every document kept so far (by the keys that
        dedup_keys made), then the counts."""
        if reason is None and self.exact and self.exact.seen(digest):
            reason = "duplicate"
        if reason is None and self.near and self.near.seen(signature):
            reason = "near_duplicate"
        if reason:
            self.dropped[reason] += 1
            return False
        if counts:
            self.redactions.update(counts)
            self.docs_redacted += 1
        self.docs_out += 1
        self.bytes_out += nbytes
        return True

    def dedup_keys(self, text: str) -> tuple[bytes | None, object]:
        return (normalized_digest(text) if self.exact else None,
                self.near.signature(text) if self.near else None)

    def __call__(self, row: dict) -> dict | None:
        self.count_in(row["bytes"] if row.get("bytes") is not None else len((row["text"] or "").encode()))
        reason, out, counts = self.transform(row)
        keys = self.dedup_keys(out["text"]) if out else (None, None)
        return out if self.admit(reason, out and out["bytes"], counts, *keys) else None

    def metrics(self) -> dict:
        return {"docs_in": self.docs_in, "docs_out": self.docs_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "docs_redacted": self.docs_redacted,
                "redactions_total": sum(self.redactions.values()),
                "redactions": dict(sorted(self.redactions.items())),
                "dropped_total": sum(self.dropped.values()),
                "dropped": dict(sorted(self.dropped.items()))}


def _worker(cfg_json: str, policy_json: str) -> Sanitizer:
    return Sanitizer(Sanitize.model_validate_json(cfg_json), Policy.model_validate_json(policy_json))


def sanitize_unit(shared: tuple[str, str], unit: tuple[str, int]) -> dict:
    """One row group through Transform (a module-level function: pool workers and Ray tasks run
    it). Returns the bytes read, the drop reasons, and the candidates with their dedup keys."""
    local = cached(_worker, *shared)  # its transform and key makers only
    rows = io.read_row_group(unit, io.DOC_SCHEMA.names).to_pylist()
    out = {"bytes_in": [], "reasons": [], "counts": [], "keys": []}
    kept = []
    for row in rows:
        out["bytes_in"].append(row["bytes"] if row.get("bytes") is not None
                               else len((row["text"] or "").encode()))
        reason, new, counts = local.transform(row)
        out["reasons"].append(reason)
        if reason is None:
            kept.append(new)
            out["counts"].append(counts)
            out["keys"].append(local.dedup_keys(new["text"]))
    out["table"] = pa.Table.from_pylist(kept, schema=io.DOC_SCHEMA)
    return out


def sanitize_table(input_dir: str | Path, output_dir: str | Path, cfg: Sanitize,
                   name: str = "docs", shard_bytes: int = 256 << 20,
                   engine: Engine | None = None) -> dict:
    """Stream `<input_dir>/<name>*.parquet` through a Sanitizer into `output_dir` atomically."""
    policy = load_policy(cfg.policy)
    sanitizer = Sanitizer(cfg, policy)
    units = io.row_groups(input_dir, name)
    t0 = time.perf_counter()
    with io.atomic_dir(output_dir) as tmp, (engine or Engine(workers=1)) as eng:
        writer = io.ShardWriter(tmp, name, shard_bytes=shard_bytes)
        shared = (cfg.model_dump_json(), policy.model_dump_json())
        for res in tqdm(eng.map(sanitize_unit, units, shared), total=len(units), unit="group",
                        desc="sanitize", disable=None):
            sizes = iter(res["table"].column("bytes").to_pylist())
            keep = []
            for nbytes, reason in zip(res["bytes_in"], res["reasons"]):
                sanitizer.count_in(nbytes)
                if reason is not None:
                    sanitizer.admit(reason, 0, None)
                    continue
                j = len(keep)
                keep.append(sanitizer.admit(None, next(sizes), res["counts"][j], *res["keys"][j]))
            writer.add_table(res["table"].filter(pa.array(keep, type=pa.bool_())))
        if sanitizer.docs_out == 0:
            dropped = {k: v for k, v in sanitizer.dropped.items() if v}
            raise UserError(f"sanitize kept no documents of {sanitizer.docs_in} (dropped: {dropped}); "
                            "loosen sanitize.min_chars / max_line_length / min_alnum_fraction or "
                            "the policy's block rules")
        writer.close()
    m = sanitizer.metrics()
    m["seconds"] = round(time.perf_counter() - t0, 2)
    m["mb_per_s"] = round(m["bytes_in"] / 1e6 / max(m["seconds"], 1e-9), 2)
    if engine is not None:
        m["engine"] = engine.describe()
    return m
