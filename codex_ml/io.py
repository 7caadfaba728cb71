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


# A Parquet row group is the unit of parallel work for the stage that reads the table next.
ROW_GROUP_BYTES = 4 << 20


class ShardWriter:
    """Write document rows as `<name>.parquet`, or `<name>-00000.parquet`, ... past `shard_bytes`.

    Rows are buffered up to `row_group_bytes` of text and written as one row group, so memory stays
    at one row group however large a shard grows. The layout depends only on the rows and the two
    sizes: the same rows give the same bytes whichever process made them.
    """

    def __init__(self, directory: Path, name: str, shard_bytes: int = 256 << 20,
                 schema: pa.Schema = DOC_SCHEMA, row_group_bytes: int | None = None):
        self.directory, self.name, self.schema = Path(directory), name, schema
        self.shard_bytes, self.row_group_bytes = shard_bytes, row_group_bytes or ROW_GROUP_BYTES
        self.buffer: list[pa.Table] = []
        self.rows: list[dict] = []
        self.pending = 0        # text bytes buffered
        self.in_file = 0        # text bytes in the open file
        self.writer: pq.ParquetWriter | None = None
        self.files: list[Path] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.pending += row.get("bytes", 0)
        if self.pending >= self.row_group_bytes or self.in_file + self.pending >= self.shard_bytes:
            self._write_group()

    def _rows_to_buffer(self) -> None:
        if self.rows:
            self.buffer.append(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def add_table(self, table: pa.Table) -> None:
        """Append rows (a table of this writer's schema), cutting row groups at `row_group_bytes`."""
        if not table.num_rows:
            return
        self._rows_to_buffer()
        sizes = table.column("bytes").to_pylist() if "bytes" in table.column_names else \
            [0] * table.num_rows
        start = 0
        for i, b in enumerate(sizes):
            self.pending += b
            if self.pending >= self.row_group_bytes or self.in_file + self.pending >= self.shard_bytes:
                self.buffer.append(table.slice(start, i + 1 - start))
                start = i + 1
                self._write_group()
        if start < table.num_rows:
            self.buffer.append(table.slice(start))

    def _write_group(self) -> None:
        self._rows_to_buffer()
        if self.writer is None:
            path = self.directory / f"{self.name}-{len(self.files):05d}.parquet"
            self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
            self.files.append(path)
        group = pa.concat_tables(self.buffer).cast(self.schema) if self.buffer else \
            self.schema.empty_table()
        self.writer.write_table(group, row_group_size=max(1, group.num_rows))
        self.in_file += self.pending
        self.buffer, self.pending = [], 0
        if self.in_file >= self.shard_bytes:
            self.writer.close()
            self.writer, self.in_file = None, 0

    def close(self) -> list[Path]:
        if self.rows or self.buffer or not self.files:
            self._write_group()
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if len(self.files) == 1:  # the common case gets the plain name
            single = self.directory / f"{self.name}.parquet"
            os.rename(self.files[0], single)
            self.files = [single]
        return self.files


def row_groups(directory: str | os.PathLike, name: str) -> list[tuple[str, int]]:
    """(file, row group index) of a document table, in order: the units parallel stages map over."""
    from .stage import UserError

    paths = shard_paths(directory, name)
    if not paths:
        raise UserError(f"no Parquet table '{name}' in {directory} (run the stage that writes it)")
    units = []
    for p in paths:
        try:
            n = pq.ParquetFile(p).metadata.num_row_groups
        except Exception as e:  # pyarrow's errors for a damaged footer vary; any of them means corrupt
            raise UserError(f"corrupt Parquet file {p}: {str(e).splitlines()[0]}") from None
        # Absolute: a Ray task runs in a directory of its own (on a cluster: the same shared mount).
        units += [(os.path.abspath(p), i) for i in range(n)]
    return units


def read_row_group(unit: tuple[str, int], columns: list[str] | None = None) -> pa.Table:
    from .stage import UserError

    path, i = unit
    try:
        return pq.ParquetFile(path).read_row_group(i, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, pa.ArrowException) and e.errno:
            raise
        raise UserError(f"corrupt Parquet file {path}: {str(e).splitlines()[0]}") from None


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
