"""Background work a sync call starts and nobody awaits, run in order per key.

A sync edit for a message this worker does not hold must catch up with Redis
and maybe keep the event there (SPEC §31), which takes round trips a sync call
cannot wait for. Its work runs here: after the earlier work of the same key
(events for one message keep their arrival order), tracked so ``drain`` and
``aclose`` wait for it, and its failure is logged and counted by ``on_error``
(nobody else would see it). Work cancelled before it ended (its loop shut down,
as ``asyncio.run`` does, or ``aclose`` gave up on it) is a failure too: the
event it carried is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any


class Chains:
    def __init__(self, on_error: Callable[[Hashable, BaseException], None]) -> None:
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._on_error = on_error

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tails

    def __len__(self) -> int:
        return len(self._tails)

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        key: Hashable,
        work: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        """Run ``work()`` on ``loop`` once the work queued for ``key`` before it ended."""
        task = loop.create_task(self._run(key, self._tails.get(key), work))
        self._tails[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))

    async def _run(
        self,
        key: Hashable,
        before: asyncio.Task[None] | None,
        work: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        if before is not None:
            await asyncio.wait([before])  # its own failure was handled where it ran
        try:
            await work()
        except Exception as exc:
            self._on_error(key, exc)

    def _forget(self, key: Hashable, done: asyncio.Task[None]) -> None:
        if self._tails.get(key) is done:
            del self._tails[key]
        if done.cancelled():
            # Possibly before it ever ran (then no except clause in _run saw it).
            self._on_error(key, asyncio.CancelledError("its event loop stopped it"))

    def waits(self) -> list[asyncio.Future[None]]:
        """Shielded waits for the last work of every key (each waits for the ones before)."""
        return [asyncio.shield(task) for task in self._tails.values()]

    async def cancel(self) -> None:
        tasks = list(self._tails.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def drop(self) -> int:
        """Forget every chain (their loop closed with them); returns how many were lost."""
        lost = len(self._tails)
        self._tails.clear()
        return lost
