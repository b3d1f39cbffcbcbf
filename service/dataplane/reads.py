"""Slow reads the review station makes (the registry, a large inspection log, the evidence
bucket), kept off the threads everything else shares and from piling up when pages are
reloaded.

Each runs on a daemon thread of its own: a read that hangs (a registry or bucket that accepts
and never answers) must not hold up the process's exit, as a `ThreadPoolExecutor`'s workers,
joined at exit, would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
KEPT = 8  # answers kept, for as many keys (e.g. `days` values)


def on_daemon_thread(name: str, fn: Callable[[], T]) -> Future:
    """Run `fn` on a new daemon thread; its outcome in the returned future."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class OneRead(Generic[T]):
    """A blocking read on a thread of its own, one at a time: a caller arriving while it runs
    waits for that same read, and its answer is reused for `fresh_s` seconds.

    Args:
        name: the thread's name.
        fresh_s: how long an answer is reused (a page may be this stale).
    """

    def __init__(self, name: str, fresh_s: float) -> None:
        self.fresh_s, self.name = fresh_s, name
        self._closed = False
        self._running: tuple[Any, Future] | None = None
        self._kept: dict[Any, tuple[float, T]] = {}  # key → (when, answer), the last KEPT keys

    async def get(self, key: Any, read: Callable[[], T], deadline: float) -> T:
        """The answer of `read` (for `key`), fresh enough.

        Raises:
            asyncio.TimeoutError: past `deadline` seconds (the read goes on; a later caller
                gets its answer), or at once while a read for another key runs (reads are
                never queued: asking for many keys costs one read at a time).
            Exception: what `read` raised.
        """
        kept = self._kept.get(key)
        if kept is not None and time.monotonic() - kept[0] < self.fresh_s:
            return kept[1]
        running = self._running
        if running is not None and not running[1].done() and running[0] != key:
            raise asyncio.TimeoutError(f"a read for {running[0]!r} is under way")
        if running is None or running[1].done():
            if self._closed:
                raise asyncio.TimeoutError("closed")
            future = on_daemon_thread(self.name, read)
            future.add_done_callback(lambda f: self._keep(key, f))
            running = self._running = (key, future)
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(running[1])), deadline)

    def _keep(self, key: Any, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._kept.pop(key, None)
            self._kept[key] = (time.monotonic(), future.result())
            while len(self._kept) > KEPT:
                self._kept.pop(next(iter(self._kept)))

    def close(self) -> None:
        """Start no more reads (one under way finishes on its own, or ends with the process)."""
        self._closed = True
