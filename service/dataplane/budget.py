"""A byte budget for work admitted at once (asyncio): decoded images in the server, request
bodies in the gateway.

Each unit of work reserves its estimated bytes before it allocates them and gives them back
when done. What does not fit waits, first come first served, up to a time limit; then the
caller answers RESOURCE_EXHAUSTED / 429 instead of running the process out of memory.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class MemoryBudget:
    """`capacity` bytes shared by concurrent reservations on one event loop.

    Args:
        capacity: bytes that reservations may hold at once.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _fits(self, amount: int) -> bool:
        return self.in_use + amount <= self.capacity

    async def acquire(self, amount: int, timeout: float) -> bool:
        """Reserve `amount` bytes, waiting up to `timeout` seconds (first come, first served).

        Returns:
            Whether the bytes were reserved. An amount over the whole capacity never is.
        """
        if amount > self.capacity:
            return False
        if not self._waiters and self._fits(amount):
            self.in_use += amount
            return True
        if timeout <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        entry = (amount, fut)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except asyncio.TimeoutError:
            return fut.done() and not fut.cancelled()  # granted just as the wait ran out
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted, but the caller is gone: give back
                self.release(amount)
            raise
        finally:
            if not fut.done():
                fut.cancel()
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()

    def release(self, amount: int) -> None:
        """Give back `amount` bytes and admit the waiters that now fit, in order."""
        self.in_use -= amount
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            amount, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(amount):
                return
            self._waiters.popleft()
            self.in_use += amount
            fut.set_result(None)

    @asynccontextmanager
    async def reserve(self, amount: int, timeout: float) -> AsyncIterator[bool]:
        """`async with budget.reserve(n, t) as ok:` holds the bytes for the block when `ok`."""
        ok = await self.acquire(amount, timeout)
        try:
            yield ok
        finally:
            if ok:
                self.release(amount)
