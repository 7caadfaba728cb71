"""Where the data stages' work runs: a local process pool, or the tasks of a Ray cluster.

A stage splits its input into units fixed by the input alone (Parquet row groups, runs of files),
maps a module-level function over them and consumes the results in unit order, in its own
process, which does everything global (exact dedup, writing). So the output is the same bytes
whatever the engine and the worker count. At most `window` units are in flight, which bounds the
memory of results waiting to be consumed.

`data.engine: ray` sends the units to Ray tasks (`ray.remote`), which read their inputs from the
paths they are given: on a multi-node cluster the data directories must be on a filesystem every
node mounts at the same path. The codex_ml package travels to the workers with the job
(runtime_env py_modules), so the nodes need only the locked dependencies.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

from ..stage import UserError

log = logging.getLogger("codex.data")


def resolve_workers(workers: int | str) -> int:
    """auto: every core this process may run on."""
    if workers == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    return int(workers)


_SHARED = None  # a pool worker's copy of the map's shared value


def _init_worker(shared, pool: bool = False) -> None:
    global _SHARED
    # One worker = one core: the Rust tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _SHARED = shared
    if pool and sys.platform.startswith("linux"):
        # Die with the stage: a stage killed with SIGKILL runs no shutdown, and its workers would
        # go on with the units already queued to them (seen: orphans burning CPU for minutes).
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the stage died before the line above ran
            os._exit(1)


def _call(fn: Callable, unit):
    return fn(_SHARED, unit)


class Engine:
    """`map(fn, units, shared)`: fn(shared, unit) for each unit, results yielded in unit order.
    `shared` (a tokenizer's JSON, a config) goes to each worker once, not with every unit."""

    def __init__(self, kind: str = "local", workers: int | str = "auto",
                 ray_address: str | None = None):
        self.kind, self.workers, self.ray_address = kind, resolve_workers(workers), ray_address
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def describe(self) -> str:
        return f"{self.kind} engine, {self.workers} worker{'s' * (self.workers != 1)}"

    def map(self, fn: Callable, units: Iterable, shared=None, window: int | None = None) -> Iterator:
        units = iter(units)  # consumed lazily: a quarter of a million file runs need not be listed
        head = list(itertools.islice(units, 2))
        units = itertools.chain(head, units)
        window = window or 2 * self.workers
        if self.kind == "ray":
            yield from self._ray_map(fn, units, shared, window)
        elif self.workers == 1 or len(head) <= 1:
            _init_worker(shared)
            yield from (fn(shared, u) for u in units)
        else:
            # spawn, not fork: the parent may hold pyarrow's or the tokenizer's threads.
            with ProcessPoolExecutor(self.workers,
                                     mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_init_worker, initargs=(shared, True)) as pool:
                yield from _windowed(lambda u: pool.submit(_call, fn, u), lambda f: f.result(),
                                     units, window)

    # ------------------------------------------------------------ ray
    def _ray_map(self, fn, units, shared, window):
        ray = self._ray()
        remote = ray.remote(num_cpus=1)(fn)
        ref = ray.put(shared)  # once into the object store; each node fetches it once
        window = max(window, 2 * self.workers)
        yield from _windowed(lambda u: remote.remote(ref, u), ray.get, units, window)

    def _ray(self):
        try:
            import ray
        except ImportError:
            raise UserError("data.engine = ray needs the ray package (pip install ray); "
                            "use data.engine: local") from None
        if not ray.is_initialized():
            import codex_ml

            address = self.ray_address or os.environ.get("RAY_ADDRESS")
            if not address:
                raise UserError("data.engine = ray: no cluster address; set data.ray_address or "
                                "RAY_ADDRESS (e.g. 10.0.0.1:6379 or ray://host:10001), or use "
                                "data.engine: local")
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                         runtime_env={"py_modules": [os.path.dirname(codex_ml.__file__)],
                                      "env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"data.engine = ray: cannot connect to the cluster at {address}: "
                                f"{str(e).splitlines()[0][:200]}") from None
            self._stack.callback(ray.shutdown)
            self.workers = int(ray.cluster_resources().get("CPU", 1))  # what describe() reports
            log.info("ray cluster at %s: %d CPUs", address, self.workers)
        return ray


def _windowed(submit, result, units, window: int) -> Iterator:
    """Submit up to `window` units ahead of the one being consumed; yield results in order."""
    pending: deque = deque()
    for u in units:
        pending.append(submit(u))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


@functools.lru_cache(maxsize=4)
def cached(factory: Callable, *key):
    """A worker's heavy state (a tokenizer, a sanitizer) made once per process and reused by
    every unit it runs, locally and on Ray alike."""
    return factory(*key)
