"""Follow the registry: re-resolve watched aliases and swap in moved versions.

Promotion in the MLflow UI moves an alias (e.g. `champion`); within one poll interval
(plus the download and warm-up of the new version) every server serves it, with no
restart and no failed request: the new version is loaded, warmed up and validated in
the background and swapped in with one reference assignment; requests already holding
the old version finish on it. If the registry cannot be reached, the server keeps
serving what it has and retries with exponential backoff.

The watcher never dies: every failure to resolve, download, parse, load or validate a
version is caught per alias (in `ModelRepository.refresh`, and again here for anything
unforeseen), logged at ERROR, counted, and shown in `GetModel.last_error`; the loop goes
on, so a later move to a good version takes effect within a poll interval plus its load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from service.errors import NotReady
from service.repository.model_repository import ModelRepository
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0


class ModelWatcher:
    """Polls `repository.refresh` for every watched alias until stopped.

    Args:
        repository: the models.
        settings: the watched aliases and the poll interval.
        run: `await run(fn, *args)` runs a blocking call off the event loop, on threads of
            the watcher's own (`DataPlane._follow`): never threads that loads requests ask
            for can fill, so a promotion or rollback never waits behind them.
    """

    def __init__(self, repository: ModelRepository, settings: Settings,
                 run: Callable[..., Awaitable]) -> None:
        self.repository = repository
        self.settings = settings
        self._run = run
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.on_change: Callable[[], None] | None = None

    async def refresh_all(self) -> bool:
        """One pass over the watched aliases; returns False if the registry was unreachable."""
        ok = True
        for name, alias in self.settings.watched():
            try:
                if await self._run(self.repository.refresh, name, alias) is not None and self.on_change:
                    self.on_change()
            except NotReady as exc:
                log.warning("registry unreachable while refreshing %s@%s: %s", name, alias, exc.message)
                ok = False
            except Exception as exc:  # never let one alias (or a bug) stop the others or the loop
                log.exception("watcher: refreshing %s@%s failed unexpectedly", name, alias)
                self.repository.record_failure((name, alias), "", f"unexpected error: {exc!r}",
                                               f"watched alias {name}@{alias}")
        return ok

    async def _loop(self) -> None:
        delay = self.settings.poll_interval_s
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                break
            except asyncio.TimeoutError:
                pass
            try:
                ok = await self.refresh_all()
            except Exception:  # e.g. the loader pool shut down under us
                log.exception("watcher: a refresh pass failed; trying again")
                ok = False
            delay = self.settings.poll_interval_s if ok else min(max(delay, 1.0) * 2, MAX_BACKOFF_S)

    def start(self) -> None:
        """Start polling in the background."""
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        if self._task is not None:
            try:  # a pass in the middle of a long load is abandoned, not awaited
                await asyncio.wait_for(self._task, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
