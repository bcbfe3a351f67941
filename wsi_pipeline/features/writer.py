"""Writing finished slides off the extraction loop: a background thread with a bounded queue.

    with SlideWriter(handle) as writer:          # handle(job, feats, err): write the h5, update the status
        for job, feats, err in run_jobs(...):
            writer.put(job, feats, err)          # returns at once unless `depth` slides are still queued

``handle`` runs on the writer thread, one slide at a time, in the order the slides were put. An exception
in ``handle`` stops the writer; it is raised again in the caller's thread by the next :meth:`put` or by
leaving the ``with`` block (after the slides already queued have been handled).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


class SlideWriter:
    """Runs ``handle(*args)`` for every :meth:`put` on one background thread (see module doc)."""

    def __init__(self, handle: Callable[..., None], depth: int = 4, name: str = "features-writer") -> None:
        self._handle = handle
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self.busy_s = 0.0  # seconds spent in handle()
        self.blocked_s = 0.0  # seconds put() waited for room in the queue
        self.handled = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            args = self._queue.get()
            if args is _STOP:
                return
            if self._error is not None:
                continue  # drop the rest: the caller will see the error
            t = time.perf_counter()
            try:
                self._handle(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            self.busy_s += time.perf_counter() - t
            self.handled += 1

    def put(self, *args: Any) -> None:
        """Queue one slide's outcome (blocks only while ``depth`` outcomes are waiting)."""
        self._raise()
        t = time.perf_counter()
        self._queue.put(args)
        self.blocked_s += time.perf_counter() - t

    def close(self) -> None:
        """Handle everything queued, stop the thread, raise the writer's error if any."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def __enter__(self) -> SlideWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        # the loop failed: still finish the slides that are done, but keep the loop's exception
        try:
            self.close()
        except Exception as e:  # noqa: BLE001 - the original exception propagates
            log.warning("while stopping after an error, writing a finished slide also failed: %s", e)
