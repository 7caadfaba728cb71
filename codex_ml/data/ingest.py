"""Collect documents from the configured sources into one Parquet table (DOC_SCHEMA)."""

from __future__ import annotations

import logging
import os
import sysconfig
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pathspec
from tqdm import tqdm

from ..io import ShardWriter, chunked, sha256_text
from ..params import DirectorySource, HFDatasetSource, Ingest, StdlibSource, TableSource
from ..stage import UserError
from .engine import Engine

log = logging.getLogger(__name__)

LANGS = {
    ".py": "python", ".pyi": "python", ".js": "javascript", ".mjs": "javascript", ".ts": "typescript",
    ".tsx": "typescript", ".jsx": "javascript", ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp",
    ".cpp": "cpp", ".hpp": "cpp", ".cs": "csharp", ".go": "go", ".rs": "rust", ".rb": "ruby",
    ".php": "php", ".swift": "swift", ".kt": "kotlin", ".scala": "scala", ".sh": "shell",
    ".bash": "shell", ".sql": "sql", ".r": "r", ".lua": "lua", ".pl": "perl", ".md": "markdown",
    ".rst": "rst", ".txt": "text", ".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml",
    ".ini": "ini", ".cfg": "ini", ".html": "html", ".css": "css", ".xml": "xml",
}

SKIP_REASONS = ("invalid_utf8", "binary", "too_large", "empty", "unreadable", "symlink_loop",
                "not_text")


def language(path: str) -> str:
    return LANGS.get(os.path.splitext(path)[1].lower(), "unknown")


class Skips:
    def __init__(self):
        self.by_source: dict[str, Counter] = defaultdict(Counter)

    def add(self, source: str, reason: str, where: str) -> None:
        self.by_source[source][reason] += 1
        log.debug("skip %s (%s)", where, reason)


def _decode(data: bytes, max_bytes: int) -> tuple[str | None, str | None]:
    """Return (text, None) or (None, skip reason)."""
    if len(data) > max_bytes:
        return None, "too_large"
    if not data.strip():
        return None, "empty"
    if b"\x00" in data:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "invalid_utf8"


def _walk(root: Path, include: list[str], exclude: list[str], follow: bool, name: str,
          skips: Skips) -> Iterator[Path]:
    """Files under root matching include and not exclude, sorted, with symlink loops detected.
    A generator: the walk is never held whole (a quarter of a million paths at 4 GB)."""
    inc = pathspec.PathSpec.from_lines("gitignore", include)
    exc = pathspec.PathSpec.from_lines("gitignore", exclude)
    seen_dirs: set[tuple[int, int]] = set()

    def visit(d: Path, ancestors: frozenset):
        try:
            st = d.stat()
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            skips.add(name, "unreadable", str(d))
            return
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            skips.add(name, "symlink_loop", str(d))
            return
        if key in seen_dirs:  # reached again through another symlink: count once
            return
        seen_dirs.add(key)
        for e in entries:
            rel = os.path.relpath(e.path, root)
            try:
                is_dir = e.is_dir(follow_symlinks=follow)
            except OSError:
                skips.add(name, "unreadable", e.path)
                continue
            if is_dir:
                if e.is_symlink() and not follow:
                    continue
                if exc.match_file(rel + "/"):
                    continue
                yield from visit(Path(e.path), ancestors | {key})
            elif inc.match_file(rel) and not exc.match_file(rel):
                if e.is_symlink() and not follow:
                    continue
                yield Path(e.path)

    return visit(root, frozenset())


FILES_PER_UNIT = 64


def read_files(shared: tuple[str, str, int], rels: list[str]) -> tuple[list[dict], list]:
    """Read, check and hash a run of files (a module-level function: the engine's workers run it).
    Returns the documents in order and the (reason, path) of each file skipped."""
    name, root, max_bytes = shared
    docs, skipped = [], []
    for rel in rels:
        f = Path(root) / rel
        try:
            if f.stat().st_size > max_bytes:  # don't read what we'll skip anyway
                skipped.append(("too_large", rel))
                continue
            data = f.read_bytes()
        except OSError as e:
            skipped.append(("symlink_loop" if e.errno == 40 else "unreadable", rel))  # ELOOP
            continue
        text, reason = _decode(data, max_bytes)
        if reason:
            skipped.append((reason, rel))
            continue
        docs.append({"id": sha256_text(text), "source": name, "path": rel, "lang": language(rel),
                     "text": text, "bytes": len(data)})
    return docs, skipped


def _file_docs(src: StdlibSource | DirectorySource, root: Path, max_bytes: int,
               skips: Skips, engine: Engine) -> Iterator[dict]:
    follow = getattr(src, "follow_symlinks", False)
    rels = (f.relative_to(root).as_posix()
            for f in _walk(root, src.include, src.exclude, follow, src.name, skips))
    with tqdm(desc=f"ingest {src.name}", unit="file", mininterval=1, leave=False,
              disable=None) as bar:
        for docs, skipped in engine.map(read_files, chunked(rels, FILES_PER_UNIT),
                                        (src.name, str(root), max_bytes)):
            for reason, rel in skipped:
                skips.add(src.name, reason, rel)
            yield from docs
            bar.update(len(docs) + len(skipped))


def _table_docs(src: TableSource, max_bytes: int, skips: Skips) -> Iterator[dict]:
    import pandas as pd
    import pyarrow.parquet as pq

    path = Path(src.path)
    if not path.is_file():
        raise UserError(f"ingest source '{src.name}': file not found: {src.path}")
    cols = [src.text_column] + ([src.path_column] if src.path_column else [])
    try:
        if src.kind == "parquet":
            pf = pq.ParquetFile(path)
            have = pf.schema_arrow.names
            chunks = (b.to_pandas() for b in pf.iter_batches(batch_size=4096,
                                                              columns=[c for c in cols if c in have]))
        elif src.kind == "csv":
            have = list(pd.read_csv(path, nrows=0).columns)
            chunks = pd.read_csv(path, chunksize=4096, usecols=lambda c: c in cols, dtype=str,
                                 keep_default_na=False)
        else:
            chunks = pd.read_json(path, lines=True, chunksize=4096, dtype=False)
            have = None
        row = 0
        for chunk in chunks:
            have = have or list(chunk.columns)
            for c in cols:
                if c not in chunk.columns:
                    raise UserError(f"ingest source '{src.name}': column '{c}' not in {src.path} "
                                    f"(columns: {', '.join(map(str, have))})")
            for i, value in enumerate(chunk[src.text_column].tolist()):
                key = (str(chunk[src.path_column].iloc[i]) if src.path_column else f"row{row}")
                row += 1
                if not isinstance(value, str):
                    skips.add(src.name, "not_text", key)
                    continue
                try:
                    data = value.encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates from JSON escapes
                    skips.add(src.name, "invalid_utf8", key)
                    continue
                text, reason = _decode(data, max_bytes)
                if reason:
                    skips.add(src.name, reason, key)
                    continue
                lang = src.lang or (language(key) if src.path_column else "unknown")
                yield {"source": src.name, "path": key, "lang": lang, "text": text}
    except UserError:
        raise
    except (ValueError, OSError) as e:  # pandas/pyarrow parse errors
        raise UserError(f"ingest source '{src.name}': cannot read {src.kind} file {src.path}: "
                        f"{str(e).splitlines()[0][:200]}") from None


def _hf_docs(src: HFDatasetSource, max_bytes: int, skips: Skips) -> Iterator[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(src.dataset, src.config, split=src.split, streaming=True)
    except Exception as e:  # offline, unknown dataset, missing config: all the user's to fix
        raise UserError(f"ingest source '{src.name}': cannot load Hugging Face dataset "
                        f"'{src.dataset}' (needs a network or a local cache): "
                        f"{str(e).splitlines()[0][:200]}") from None
    for i, ex in enumerate(ds):
        if src.max_rows and i >= src.max_rows:
            break
        key = str(ex.get(src.path_column)) if src.path_column else f"row{i}"
        value = ex.get(src.text_column)
        if not isinstance(value, str):
            skips.add(src.name, "not_text", key)
            continue
        text, reason = _decode(value.encode("utf-8", "surrogatepass"), max_bytes)
        if reason:
            skips.add(src.name, reason, key)
            continue
        yield {"source": src.name, "path": key, "lang": language(key), "text": text}


def source_docs(src, cfg: Ingest, skips: Skips, engine: Engine) -> Iterator[dict]:
    if src.kind in ("python-stdlib", "python-site-packages"):
        root = sysconfig.get_paths()["stdlib" if src.kind == "python-stdlib" else "purelib"]
        return _file_docs(src, Path(root), cfg.max_file_bytes, skips, engine)
    if src.kind == "directory":
        root = Path(src.path)
        if not root.is_dir():
            raise UserError(f"ingest source '{src.name}': directory not found: {src.path}")
        return _file_docs(src, root, cfg.max_file_bytes, skips, engine)
    if src.kind == "hf-dataset":
        return _hf_docs(src, cfg.max_file_bytes, skips)
    return _table_docs(src, cfg.max_file_bytes, skips)


def check_sources(cfg: Ingest) -> None:
    """Fail on a missing source path before any work is done or anything is written."""
    for src in cfg.sources:
        p = getattr(src, "path", None)
        if p is not None and not Path(p).exists():
            raise UserError(f"ingest source '{src.name}': path not found: {p}")


def ingest(cfg: Ingest, out_dir: Path, engine: Engine | None = None) -> dict:
    """Write out_dir/docs*.parquet; return the metrics dict. Files are read by the engine's
    workers; tables and datasets stream through this process."""
    check_sources(cfg)
    skips = Skips()
    writer = ShardWriter(out_dir, "docs", cfg.shard_bytes)
    per_source = {}
    engine = engine or Engine(workers=1)
    for src in cfg.sources:
        n = nbytes = 0
        for doc in source_docs(src, cfg, skips, engine):
            if "id" not in doc:
                doc["bytes"] = len(doc["text"].encode("utf-8"))
                doc["id"] = sha256_text(doc["text"])
            writer.add(doc)
            n += 1
            nbytes += doc["bytes"]
        per_source[src.name] = {"kind": src.kind, "documents": n, "bytes": nbytes,
                                "skipped": dict(sorted(skips.by_source[src.name].items()))}
        log.info("source %s: %d documents, %.1f MB, skipped %s", src.name, n, nbytes / 1e6,
                 dict(skips.by_source[src.name]) or "none")
    files = writer.close()
    total_skips = Counter()
    for c in skips.by_source.values():
        total_skips.update(c)
    return {
        "documents": sum(s["documents"] for s in per_source.values()),
        "bytes": sum(s["bytes"] for s in per_source.values()),
        "skipped": {r: total_skips.get(r, 0) for r in SKIP_REASONS},
        "sources": per_source,
        "shards": len(files),
    }
