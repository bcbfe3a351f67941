"""Batch execution over slides: sharding across cluster ranks and crash-isolated parallel workers.

A slide that raises, or even kills its worker process (a segfault in a codec), is reported as a failed
result; the other slides go on.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

from wsi_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Shard:
    index: int = 0
    count: int = 1

    def select(self, items: Sequence[T]) -> list[T]:
        """Round-robin share of ``items`` (sorted input → stable, balanced shards)."""
        return [it for i, it in enumerate(items) if i % self.count == self.index]


def parse_shard(text: str | None) -> Shard:
    """``--shard I/N`` (0-based I), else torchrun (RANK/WORLD_SIZE), else SLURM (SLURM_PROCID/SLURM_NTASKS)."""
    if text:
        try:
            i, n = (int(v) for v in text.split("/"))
        except ValueError as e:
            raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from e
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {text!r}: need 0 <= I < N")
        return Shard(i, n)
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and size_var in os.environ:
            return Shard(int(os.environ[rank_var]), max(1, int(os.environ[size_var])))
    return Shard()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Outcome(Generic[T]):
    item: T
    ok: bool
    value: Any = None
    error: str = ""
    error_type: str = ""
    seconds: float = 0.0


def _child(fn: Callable[[Any], Any], item: Any, conn: Connection) -> None:
    t0 = time.perf_counter()
    try:
        value = fn(item)
        conn.send((True, value, "", "", time.perf_counter() - t0))
    except BaseException as e:  # noqa: BLE001 - the parent must always get an answer
        log.debug("worker failed on %s:\n%s", item, traceback.format_exc())
        conn.send((False, None, str(e) or repr(e), type(e).__name__, time.perf_counter() - t0))
    finally:
        conn.close()


def _in_process(fn: Callable[[T], Any], item: T) -> Outcome[T]:
    t0 = time.perf_counter()
    try:
        return Outcome(item, True, fn(item), seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - isolation is the point: record and go on
        log.debug("failed on %s:\n%s", item, traceback.format_exc())
        return Outcome(item, False, None, str(e) or repr(e), type(e).__name__, time.perf_counter() - t0)


def map_isolated(
    fn: Callable[[T], Any], items: Iterable[T], workers: int = 1
) -> Iterable[Outcome[T]]:
    """Apply ``fn`` to every item, yielding outcomes as they finish.

    ``workers == 0`` runs in this process (no crash isolation; for debugging). Otherwise each item runs in
    its own forked process, at most ``workers`` at a time.
    """
    items = list(items)
    if workers <= 0:
        for it in items:
            yield _in_process(fn, it)
        return
    ctx = mp.get_context("fork")
    pending = list(reversed(items))
    running: dict[Connection, tuple[Any, Any, float]] = {}
    while pending or running:
        while pending and len(running) < workers:
            item = pending.pop()
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, item, send), daemon=True)
            proc.start()
            send.close()
            running[recv] = (item, proc, time.perf_counter())
        for conn in wait(list(running)):
            item, proc, t0 = running.pop(conn)
            try:
                ok, value, err, etype, secs = conn.recv()
                yield Outcome(item, ok, value, err, etype, secs)
            except EOFError:
                proc.join()
                code = proc.exitcode
                yield Outcome(
                    item, False, None,
                    f"worker process died (exit code {code}); the file may be corrupt or memory ran out",
                    "WorkerCrash", time.perf_counter() - t0,
                )
            finally:
                conn.close()
                proc.join()
