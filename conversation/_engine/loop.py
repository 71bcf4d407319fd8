"""Which event loop runs the engine, the hand-off from plain threads, the closed flag.

The first loop that uses the engine owns it. A call from another running loop
is refused while the owner is open (its locks, futures and pooled connections
belong to the owner), and takes the engine over once the owner has closed
(``asyncio.run`` per request): ``on_move`` then gives every loop-bound object
of the old loop a fresh one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from .._errors import ConfigurationError

T = TypeVar("T")


class LoopBinding:
    def __init__(self, on_move: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_move = on_move
        self.closed = False

    def current(self) -> asyncio.AbstractEventLoop | None:
        """The engine's loop if it runs, after binding to the caller's running loop.

        ``None``: no loop runs the engine (a thread calling before any loop did,
        or after its loop stopped).
        """
        running = running_loop()
        loop = self._loop
        if running is not None and running is not loop:
            if loop is not None and not loop.is_closed():
                raise ConfigurationError(
                    "this manager belongs to another event loop, which is still open: "
                    "use it from that loop (or from a plain thread), or give each loop "
                    "its own manager"
                )
            self._loop = running
            if loop is not None:
                self._on_move(running)
            loop = running
        if loop is not None and (loop.is_closed() or not loop.is_running()):
            return None
        return loop

    def hand_off(
        self, loop: asyncio.AbstractEventLoop, timeout: float, fn: Callable[..., T], *args: Any
    ) -> T:
        """Run ``fn(*args)`` on ``loop`` from a thread without one, and wait for it."""
        return asyncio.run_coroutine_threadsafe(_call(fn, *args), loop).result(timeout=timeout)


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)
