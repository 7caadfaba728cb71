"""Token shards: each split tokenized once into flat, memory-mappable arrays (the tokenize stage).

Files in the output directory (data/tokens/), per split `s` and shard `k`:

    s-0000k.bin   token ids, little-endian uint16 (vocabularies of at most 65,536) or uint32,
                  every document followed by EOS, documents in the split's order
    s-0000k.idx   little-endian uint64, documents + 1 offsets into the .bin, in tokens:
                  document i is bin[idx[i]:idx[i + 1]] (its EOS included); idx[0] = 0
    manifest.json format, dtype, eos_id, vocab_size, the tokenizer's hash, the dataset version,
                  and per split and shard: documents, tokens, sha256 of each file

The shape of nanoGPT's and llm.c's .bin (a flat array np.memmap reads as is) plus a document index
like Megatron's .idx, without its header: the dtype lives in the manifest. A shard closes at the
first document end past `shard_tokens`, so no document straddles two shards. The bytes depend only
on the split's documents, the tokenizer and shard_tokens, never on the engine or the worker count.
"""

from __future__ import annotations

import json
import os
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import io
from ..stage import UserError
from .engine import Engine, cached

log = logging.getLogger("codex.tokenize")

FORMAT = "codex-tokens/1"
SPLITS = ("train", "val", "test")


def tokenizer_hash(path: str | Path) -> str:
    """The hash of every file of a tokenizer directory: tokens made with it carry it."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return io.sha256_text("".join(f"{f.relative_to(path)}:{io.sha256_file(f)}\n" for f in files))


def _backend(backend_json: str | None, tokenizer_dir: str, split_special: bool):
    if backend_json is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend_json)
        # Not part of the JSON: without it "</s>" written in a document would become EOS.
        tok.encode_special_tokens = split_special
        return tok
    from ..modeling import load_tokenizer  # a slow (Python) tokenizer of a pretrained base

    return load_tokenizer(tokenizer_dir)


def encode_unit(shared: tuple, unit: tuple[str, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenize one row group of a split: (ids with EOS after each document, document lengths in
    tokens, UTF-8 bytes read). A module-level function: it runs in pool workers and Ray tasks."""
    backend_json, tokenizer_dir, split_special, eos, dtype = shared
    tok = cached(_backend, backend_json, tokenizer_dir, split_special)
    texts = [t or "" for t in io.read_row_group(unit, ["text"]).column("text").to_pylist()]
    if backend_json is not None:
        seqs = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    else:
        seqs = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
    lengths = np.fromiter((len(s) + 1 for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.fromiter((i for s in seqs for i in (*s, eos)), dtype=dtype, count=int(lengths.sum()))
    return ids, lengths, sum(len(t.encode("utf-8")) for t in texts)


class _SplitWriter:
    """Appends documents' ids to s-0000k.bin / .idx, opening the next shard past shard_tokens."""

    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self.bin = self.offsets = None

    def _open(self) -> None:
        k = len(self.shards)
        name = f"{self.split}-{k:05d}"
        self.bin = open(self.out / f"{name}.bin", "wb")
        self.offsets = [0]
        self.shards.append({"bin": f"{name}.bin", "idx": f"{name}.idx", "documents": 0, "tokens": 0})

    def _close(self) -> None:
        self.bin.close()
        s = self.shards[-1]
        np.asarray(self.offsets, dtype="<u8").tofile(self.out / s["idx"])
        s["documents"], s["tokens"] = len(self.offsets) - 1, self.offsets[-1]
        s["bin_sha256"] = io.sha256_file(self.out / s["bin"])
        s["idx_sha256"] = io.sha256_file(self.out / s["idx"])
        self.bin = None

    def _write(self, ids: np.ndarray) -> None:
        self.bin.write(ids.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        pos = 0  # the first of `ids` not yet written
        for end, n in zip(np.cumsum(lengths).tolist(), lengths.tolist()):
            if self.bin is None:
                self._open()
            self.offsets.append(self.offsets[-1] + n)
            if self.offsets[-1] >= self.shard_tokens:
                self._write(ids[pos:end])
                pos = end
                self._close()
        if pos < len(ids):
            self._write(ids[pos:])

    def close(self) -> list[dict]:
        if self.bin is None and not self.shards:
            self._open()
        if self.bin is not None:
            self._close()
        return self.shards


def read_manifest(directory: str | Path, name: str = "manifest.json", stage: str = "tokenize") -> dict:
    path = Path(directory) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found (run the {stage} stage)") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def tokenize(splits: str | Path, tokenizer_dir: str | Path, out: str | Path, shard_tokens: int,
             engine: Engine) -> dict:
    """The stage: every split of `splits` into token shards under `out` (atomically); metrics."""
    splits, out = Path(splits), Path(out)
    dataset_version = read_manifest(splits, stage="split").get("dataset_version")
    from ..modeling import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    # The workers get the Rust backend itself (no transformers, no torch to import), which gives
    # the ids `tok(text, add_special_tokens=False)` does when it encodes special tokens' text as
    # text, as the tokenizer's split_special_tokens says.
    backend = getattr(tok, "backend_tokenizer", None)
    shared = (backend.to_str() if backend is not None else None, os.path.abspath(tokenizer_dir),
              bool(backend is not None and backend.encode_special_tokens), tok.eos_token_id)
    vocab = len(tok)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    manifest = {"format": FORMAT, "dtype": dtype, "eos_id": tok.eos_token_id, "vocab_size": vocab,
                "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
                "dataset_version": dataset_version, "shard_tokens": shard_tokens, "splits": {}}
    metrics: dict = {"engine": engine.describe(), "dtype": dtype}
    t0 = time.perf_counter()
    nbytes_all = tokens_all = 0
    with io.atomic_dir(out) as tmp:
        for split in SPLITS:
            units = io.row_groups(splits, split)
            w = _SplitWriter(tmp, split, dtype, shard_tokens)
            nbytes = 0
            for ids, lengths, b in tqdm(engine.map(encode_unit, units, (*shared, dtype)),
                                        total=len(units), unit="group",
                                        desc=f"tokenize {split}", disable=None, leave=False):
                w.add(ids, lengths)
                nbytes += b
            shards = w.close()
            docs, tokens = sum(s["documents"] for s in shards), sum(s["tokens"] for s in shards)
            manifest["splits"][split] = {"documents": docs, "tokens": tokens, "bytes": nbytes,
                                         "shards": shards}
            metrics[split] = {"documents": docs, "tokens": tokens, "bytes": nbytes,
                              "shards": len(shards),
                              "bytes_per_token": round(nbytes / max(tokens - docs, 1), 4)}
            nbytes_all += nbytes
            tokens_all += tokens
        io.write_json(tmp / "manifest.json", manifest)
    seconds = time.perf_counter() - t0
    metrics.update(seconds=round(seconds, 2), mb_per_s=round(nbytes_all / 1e6 / max(seconds, 1e-9), 2),
                   tokens_per_s=round(tokens_all / max(seconds, 1e-9), 1))
    return metrics


# ---------------------------------------------------------------- reading (train_model)
class TokenBlocks:
    """A split's token stream (its shards end to end) cut into `block_size` blocks, as packing
    did: block i is tokens [i * block_size, (i + 1) * block_size); the remainder is dropped.
    Shards are numpy memmaps: memory does not grow with the corpus, and a block is read only when
    it is asked for (by each rank, only its own)."""

    def __init__(self, directory: str | Path, split: str, block_size: int,
                 manifest: dict | None = None):
        directory = Path(directory)
        manifest = manifest or read_manifest(directory)
        if manifest.get("format") != FORMAT:
            raise UserError(f"{directory}/manifest.json: format {manifest.get('format')!r}, "
                            f"this code reads {FORMAT!r}; rerun the tokenize stage")
        if split not in manifest["splits"]:
            raise UserError(f"{directory}/manifest.json has no split '{split}' "
                            f"(has: {', '.join(manifest['splits'])})")
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.arrays, self.docs = [], 0
        for s in manifest["splits"][split]["shards"]:
            path = directory / s["bin"]
            size = path.stat().st_size if path.exists() else None
            if size != s["tokens"] * dtype.itemsize:
                raise UserError(f"{path}: {size} bytes, the manifest says {s['tokens']} tokens of "
                                f"{dtype.itemsize} bytes; rerun the tokenize stage")
            if s["tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
            self.docs += s["documents"]
        self.starts = np.cumsum([0] + [len(a) for a in self.arrays])
        self.tokens = int(self.starts[-1])
        self.block_size = block_size

    def __len__(self) -> int:
        return self.tokens // self.block_size

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        lo, hi = i * self.block_size, (i + 1) * self.block_size
        k = int(np.searchsorted(self.starts, lo, side="right")) - 1
        parts = []
        while lo < hi:  # a block may run over a shard's end into the next
            a, off = self.arrays[k], lo - int(self.starts[k])
            take = min(hi - lo, len(a) - off)
            parts.append(a[off:off + take])
            lo += take
            k += 1
        return np.concatenate(parts).astype(np.int64) if len(parts) > 1 else parts[0].astype(np.int64)


    def all(self) -> np.ndarray:
        """Every block at once, [len(self), block_size] int64: for benchmarks and tests that
        index them in memory."""
        flat = np.concatenate(self.arrays) if self.arrays else np.zeros(0, np.int64)
        return flat[:len(self) * self.block_size].reshape(len(self), self.block_size).astype(np.int64)


def documents(directory: str | Path, split: str) -> list[np.ndarray]:
    """Every document's ids (with its EOS) of a split, from the shards' index: for tests and tools."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    out = []
    for s in manifest["splits"][split]["shards"]:
        ids = np.fromfile(directory / s["bin"], dtype=dtype)
        idx = np.fromfile(directory / s["idx"], dtype="<u8")
        out += [ids[idx[i]:idx[i + 1]] for i in range(len(idx) - 1)]
    return out
