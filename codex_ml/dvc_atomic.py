"""Atomic writes of DVC's own files (dvc.lock, dvc.yaml, params files, .dvc/tmp/rwlock).

DVC 3.67.1 writes them in place: it truncates the file (`open(path, "w+")`), then dumps the new
text. A `kill -9` between the two leaves a truncated dvc.lock, and the next `dvc repro` stops with
"'./dvc.lock' validation failed" (seen in tests/test_faults.py's kill rounds); a truncated
rwlock stops it with "Unable to read RWLock-file '.dvc/tmp/rwlock'. JSON structure is corrupted"
(seen there too, a kill landing as a stage started). tools/install.py puts a one-line .pth file
into the virtualenv that imports this module at interpreter start; it waits for DVC to import its
serializer and its rwlock module and swaps their writers for ones that write a temporary sibling
and rename it over the file, so a kill leaves either the old or the new file.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "dvc.utils.serialize._common"
RWLOCK = "dvc.rwlock"


def alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def atomic(dump):
    def _dump_data(path, data, dumper, fs=None, **dumper_args):
        if fs is not None and getattr(fs, "protocol", None) != "local":
            return dump(path, data, dumper, fs=fs, **dumper_args)
        path = os.fspath(path)
        head, name = os.path.split(path)
        tmp = os.path.join(head, f".tmp-{name}-{os.getpid()}")  # .gitignore: .tmp*
        for old in glob.glob(os.path.join(glob.escape(head), f".tmp-{glob.escape(name)}-*")):
            if not alive(old.rsplit("-", 1)[1]):  # left by a writer that was killed
                os.unlink(old)
        try:
            with open(tmp, "w", encoding="utf-8") as fd:
                dumper(data, fd, **dumper_args)
                fd.flush()
                os.fsync(fd.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    _dump_data.atomic = True
    return _dump_data


def patch(module) -> None:
    if not getattr(module._dump_data, "atomic", False):
        module._dump_data = atomic(module._dump_data)


class _AtomicFile:
    """A text file written to a temporary sibling and renamed over `path` when closed whole."""

    def __init__(self, path: str, **kw):
        head, name = os.path.split(path)
        self.path, self.tmp = path, os.path.join(head, f".tmp-{name}-{os.getpid()}")
        self.fd = open(self.tmp, "w", **kw)

    def __getattr__(self, name):
        return getattr(self.fd, name)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        self.fd.flush()
        os.fsync(self.fd.fileno())
        self.fd.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


class _AtomicWrites:
    """A local DVC filesystem whose open(path, "w") is an _AtomicFile; all else passes through."""

    def __init__(self, fs):
        self._fs = fs

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def open(self, path, mode="r", **kw):
        if "w" in mode and getattr(self._fs, "protocol", None) == "local":
            return _AtomicFile(os.fspath(path), **kw)
        return self._fs.open(path, mode, **kw)


def patch_rwlock(module) -> None:
    edit = module._edit_rwlock
    if getattr(edit, "atomic", False):
        return

    def _edit_rwlock(lock_dir, fs, hardlink):
        return edit(lock_dir, _AtomicWrites(fs), hardlink)
    _edit_rwlock.atomic = True
    module._edit_rwlock = _edit_rwlock


PATCHES = {TARGET: patch, RWLOCK: patch_rwlock}


class _Finder(importlib.abc.MetaPathFinder):
    """Patches DVC's serializer right after it is imported: its siblings (_yaml, _json, _toml)
    import `_dump_data` by name, so the swap must happen before they run."""

    codex_dvc_atomic = True  # one finder, whether loaded as codex_ml.dvc_atomic or by file path

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                PATCHES[name](module)

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    for name, fix in PATCHES.items():
        if name in sys.modules:  # too late for the siblings' own references; patch what we can
            fix(sys.modules[name])
    if not any(getattr(f, "codex_dvc_atomic", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
