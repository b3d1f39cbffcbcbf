"""Slow reads the review station makes (the registry, a large inspection log), kept off the
threads everything else shares and from piling up when pages are reloaded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class OneRead(Generic[T]):
    """A blocking read on a thread of its own, one at a time: a caller arriving while it runs
    waits for that same read, and its answer is reused for `fresh_s` seconds.

    Args:
        name: the thread's name.
        fresh_s: how long an answer is reused (a page may be this stale).
    """

    def __init__(self, name: str, fresh_s: float) -> None:
        self.fresh_s = fresh_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._running: tuple[Any, Future] | None = None
        self._kept: tuple[Any, float, T] | None = None  # (key, when, answer)

    async def get(self, key: Any, read: Callable[[], T], deadline: float) -> T:
        """The answer of `read` (for `key`), fresh enough.

        Raises:
            asyncio.TimeoutError: past `deadline` seconds (the read goes on; a later caller
                gets its answer).
            Exception: what `read` raised.
        """
        kept = self._kept
        if kept is not None and kept[0] == key and time.monotonic() - kept[1] < self.fresh_s:
            return kept[2]
        if self._running is None or self._running[0] != key or self._running[1].done():
            future = self._executor.submit(read)
            future.add_done_callback(lambda f: self._keep(key, f))
            self._running = (key, future)
        return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._running[1])), deadline)

    def _keep(self, key: Any, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._kept = (key, time.monotonic(), future.result())

    def close(self) -> None:
        """Stop the thread (a read under way finishes on its own)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
