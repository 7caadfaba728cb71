"""Atomic outputs, Parquet document shards and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# The fixed schema of every document table the data stages write.
DOC_SCHEMA = pa.schema([
    ("id", pa.string()),        # sha256 of the UTF-8 text
    ("source", pa.string()),    # the ingest source's name
    ("path", pa.string()),      # path relative to the source root (or row key for tables)
    ("lang", pa.string()),      # language by extension
    ("text", pa.large_string()),
    ("bytes", pa.int64()),      # UTF-8 byte length of text
])


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on failure it is removed.

    The previous contents of `path` stay untouched until the new ones are complete, so a crash,
    kill or Ctrl-C never leaves a half-written output behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _recover(path: Path) -> None:
    """Clean up after a run killed with SIGKILL (no cleanup handlers ran): put back an output that
    was moved aside but not yet replaced, and delete abandoned temporary directories."""
    olds = sorted(path.parent.glob(f".{path.name}.old-*"))
    if olds and not path.exists():
        os.rename(olds.pop(), path)
    for stale in [*olds, *path.parent.glob(f".{path.name}.tmp-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file through a temporary sibling and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ShardWriter:
    """Write document rows as `<name>.parquet`, or `<name>-00000.parquet`, ... past `shard_bytes`."""

    def __init__(self, directory: Path, name: str, shard_bytes: int = 256 << 20,
                 schema: pa.Schema = DOC_SCHEMA):
        self.directory, self.name, self.shard_bytes, self.schema = directory, name, shard_bytes, schema
        self.rows: list[dict] = []
        self.pending = 0
        self.files: list[Path] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.pending += row.get("bytes", 0)
        if self.pending >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        path = self.directory / f"{self.name}-{len(self.files):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        pq.write_table(table, path, compression="zstd")
        self.files.append(path)
        self.rows, self.pending = [], 0

    def close(self) -> list[Path]:
        if self.rows or not self.files:
            self._flush()
        if len(self.files) == 1:  # the common case gets the plain name
            single = self.directory / f"{self.name}.parquet"
            os.rename(self.files[0], single)
            self.files = [single]
        return self.files


def shard_paths(directory: str | os.PathLike, name: str) -> list[Path]:
    directory = Path(directory)
    single = directory / f"{name}.parquet"
    if single.exists():
        return [single]
    return sorted(directory.glob(f"{name}-[0-9][0-9][0-9][0-9][0-9].parquet"))


def chunked(items: Iterable, n: int) -> Iterator[list]:
    """Lists of up to n items in order (itertools.batched, which Python 3.11 lacks)."""
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch


def iter_batches(directory: str | os.PathLike, name: str, columns: list[str] | None = None,
                 batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream a document table batch by batch, so memory stays flat as the data grows."""
    from .stage import UserError

    paths = shard_paths(directory, name)
    if not paths:
        raise UserError(f"no Parquet table '{name}' in {directory} (run the stage that writes it)")
    for p in paths:
        try:
            f = pq.ParquetFile(p)
            yield from f.iter_batches(batch_size=batch_size, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            if isinstance(e, OSError) and not isinstance(e, pa.ArrowException) and e.errno:
                raise
            raise UserError(f"corrupt Parquet file {p}: {str(e).splitlines()[0]}") from None


def iter_rows(directory, name, columns=None, batch_size=1024) -> Iterator[dict]:
    for b in iter_batches(directory, name, columns, batch_size):
        yield from b.to_pylist()


def read_table(directory, name, columns=None) -> pa.Table:
    batches = list(iter_batches(directory, name, columns))
    if not batches:
        return pa.Table.from_pylist([], schema=DOC_SCHEMA).select(columns or DOC_SCHEMA.names)
    return pa.Table.from_batches(batches)
