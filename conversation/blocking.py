"""The engine for plain sync programs: ``BlockingConversationManager`` (SPEC §26).

A ``ConversationManager`` runs on a private event loop thread, started with
anyio's blocking portal; every public method of the manager is offered here
as a blocking call that any thread may make, named without ``_async``:

- a method with an ``_async`` form (``append_async``, ``get_messages_async``,
  ...) is offered under the plain name, running the ``_async`` form: reads catch
  up with Redis like ``get_messages_async``, and writes return once Redis
  confirmed them;
- a coroutine method without the suffix (``ensure_fresh_from_redis``,
  ``consolidate``, ``list_archives``, ``drain``) keeps its name;
- a plain method (``stats``, ``get_channel_limit``, ...) keeps its name and runs
  on the engine's thread too (the engine's state belongs to that thread);
- a method returning an async iterator (``changes``) keeps its name and
  returns a blocking iterator: each ``next()`` pulls one item through the
  portal (waiting on the engine's loop as the async iterator would), and
  closing the iterator (``close()``, or leaving a ``for`` loop early) closes the
  async one on the engine's loop;
- ``aclose`` becomes ``close``, which also stops the loop thread.

Writes are ``durable`` unless told otherwise: a write Redis does not confirm
within ``durable_timeout`` raises ``DurabilityError`` and leaves this worker's
memory, as a sync caller expects of a store (it never only logs, and never
retries for ever behind a blocked caller). ``durable=False`` waits however long
Redis takes.

A manager left open when the program exits is closed by an ``atexit`` hook
(its writes flushed), so a script that forgets ``close()`` neither hangs nor
loses what it wrote. The flush is bounded by the manager's ``exit_timeout``
(30 s unless told otherwise), and every open manager flushes at the same time:
with Redis down, exit waits the longest ``exit_timeout``, not their sum.

The Redis client is built by ``client_factory`` ON the engine's thread, so its
connections belong to the loop that uses them. ``tests/test_blocking.py``
checks that the methods here are exactly the manager's, renamed by the rule
above, with the same parameters.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import anyio
from anyio.from_thread import BlockingPortal
from redis.asyncio import Redis

from ._errors import ConfigurationError
from ._manager import ConversationManager, Renderer

__all__ = ["BlockingConversationManager"]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

C = TypeVar("C", bound=Callable[..., Any])

ClientFactory = Callable[[], Any]

#: Seconds the exit hook flushes a manager left open (``exit_timeout=``).
DEFAULT_EXIT_TIMEOUT: Final = 30.0


def _waits(
    method: Callable[Concatenate[ConversationManager, P], Awaitable[R]],
) -> Callable[Concatenate[BlockingConversationManager, P], R]:
    """A coroutine method of the manager, awaited on the engine's loop."""

    def call(self: BlockingConversationManager, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._await(method, *args, **kwargs)

    return _named(call, method)


def _writes(
    method: Callable[Concatenate[ConversationManager, P], Awaitable[R]],
) -> Callable[Concatenate[BlockingConversationManager, P], R]:
    """A write of the manager, durable unless the caller passes ``durable=False``."""

    def call(self: BlockingConversationManager, /, *args: P.args, **kwargs: P.kwargs) -> R:
        kwargs.setdefault("durable", True)
        return self._await(method, *args, **kwargs)

    return _named(call, method)


def _runs(
    method: Callable[Concatenate[ConversationManager, P], R],
) -> Callable[Concatenate[BlockingConversationManager, P], R]:
    """A plain method of the manager, run on the engine's thread."""

    def call(self: BlockingConversationManager, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._call(method, *args, **kwargs)

    return _named(call, method)


def _follows(
    method: Callable[Concatenate[ConversationManager, P], AsyncIterator[R]],
) -> Callable[Concatenate[BlockingConversationManager, P], Generator[R, None, None]]:
    """A method returning an async iterator, as a blocking iterator of the same items."""

    def call(
        self: BlockingConversationManager, /, *args: P.args, **kwargs: P.kwargs
    ) -> Generator[R, None, None]:
        # Built here, not at the first next(): bad arguments raise at the call,
        # as they do from the async method.
        source = self._call(method, *args, **kwargs)
        return self._pull(source)

    return _named(call, method)


def _named(call: C, method: Callable[..., Any]) -> C:
    functools.update_wrapper(call, method)  # name, doc, and __wrapped__ for the rule's test
    call.__name__ = call.__qualname__ = method.__name__.removesuffix("_async")
    return call


class BlockingConversationManager:
    """A ``ConversationManager`` for sync code, on a private event loop thread.

    ``client_factory`` builds the ``redis.asyncio`` client (``decode_responses``
    off) and is called on the engine's thread; ``None`` keeps everything in
    memory. ``settings`` are ``ConversationManager``'s keyword arguments
    (``max_history``, ``key_prefix``, ``ttl_seconds``, ...). The client a factory
    builds belongs to this manager: ``close()`` closes it. ``exit_timeout``
    bounds the flush at program exit when ``close()`` was never called.

    Safe to call from any number of threads at once. Calling it from inside a
    running event loop would block that loop: async code uses
    ``ConversationManager`` itself (or ``submit``). A call from the engine's own
    thread (inside ``run``) would wait for itself, and is refused.

    It belongs to the process that built it: a child forked after (a pre-fork
    server's worker) has no engine thread, so there it counts as ``closed``,
    every call raises ``ConfigurationError``, and the child builds its own
    (``from_url`` adapters do that by themselves). Writes the parent made are
    the parent's to flush.
    """

    def __init__(
        self,
        client_factory: ClientFactory | None,
        prompt_renderer: Renderer | None = None,
        *,
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
        **settings: Any,
    ) -> None:
        if (
            isinstance(exit_timeout, bool)
            or not isinstance(exit_timeout, int | float)
            or not 0 <= exit_timeout < float("inf")
        ):
            raise ConfigurationError(
                f"exit_timeout is a number of seconds >= 0, got {exit_timeout!r:.40}"
            )
        self._exit_timeout = float(exit_timeout)
        if client_factory is not None and not callable(client_factory):
            raise ConfigurationError(
                "client_factory must be a callable that builds a redis.asyncio client "
                f"(or None for memory only), not {type(client_factory).__name__}; "
                "use BlockingConversationManager.from_url(url) for a URL"
            )
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._portal, self._thread, self._loop = _start_portal()
        self._client: Any = None
        try:
            if client_factory is not None:
                self._client = self._portal.call(client_factory)
            self._manager = self._portal.call(
                functools.partial(
                    ConversationManager, prompt_renderer, redis=self._client, **settings
                )
            )
        except BaseException:
            self._stop()
            raise
        _OPEN.add(self)

    @classmethod
    def from_url(
        cls,
        url: str,
        prompt_renderer: Renderer | None = None,
        *,
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
        **settings: Any,
    ) -> BlockingConversationManager:
        """A manager on a ``redis.asyncio.Redis.from_url(url)`` client (``redis://``,
        ``rediss://``, ``unix://``)."""
        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"a Redis URL is a non-empty string, got {url!r:.80}")

        def client() -> Any:
            return Redis.from_url(url, decode_responses=False)

        return cls(client, prompt_renderer, exit_timeout=exit_timeout, **settings)

    # --------------------------------------------------------------- the rule

    append = _writes(ConversationManager.append_async)
    append_many = _writes(ConversationManager.append_many_async)
    update_message = _writes(ConversationManager.update_message_async)
    mark_deleted = _writes(ConversationManager.mark_deleted_async)
    patch_reactions = _writes(ConversationManager.patch_reactions_async)
    add_reaction = _writes(ConversationManager.add_reaction_async)
    remove_reaction = _writes(ConversationManager.remove_reaction_async)
    clear_reactions = _writes(ConversationManager.clear_reactions_async)
    clear = _writes(ConversationManager.clear_async)
    set_channel_limit = _writes(ConversationManager.set_channel_limit_async)
    discard_rebackfill_request = _writes(ConversationManager.discard_rebackfill_request_async)
    backfill = _writes(ConversationManager.backfill_async)

    get_messages = _waits(ConversationManager.get_messages_async)
    ensure_fresh_from_redis = _waits(ConversationManager.ensure_fresh_from_redis)
    consolidate = _waits(ConversationManager.consolidate)
    list_archives = _waits(ConversationManager.list_archives)
    drain = _waits(ConversationManager.drain)

    read_since = _waits(ConversationManager.read_since)
    get_cursor = _waits(ConversationManager.get_cursor)
    set_cursor = _waits(ConversationManager.set_cursor)
    export_room = _waits(ConversationManager.export_room)
    import_room = _waits(ConversationManager.import_room)

    changes = _follows(ConversationManager.changes)

    get_channel_limit = _runs(ConversationManager.get_channel_limit)
    is_rebackfill_requested = _runs(ConversationManager.is_rebackfill_requested)
    last_history_role = _runs(ConversationManager.last_history_role)
    get_history_message_count = _runs(ConversationManager.get_history_message_count)
    should_consolidate = _runs(ConversationManager.should_consolidate)
    reap_stale = _runs(ConversationManager.reap_stale)
    stats = _runs(ConversationManager.stats)
    rooms = _runs(ConversationManager.rooms)

    # -------------------------------------------------------------- lifecycle

    def run(self, fn: Callable[[ConversationManager], Awaitable[R]]) -> R:
        """Await ``fn(manager)`` on the engine's loop: several async calls in one hop.

        ``manager`` is the ``ConversationManager`` inside; it must not escape
        ``fn`` (it belongs to the engine's thread).
        """
        return self._await(fn)

    def submit(
        self, fn: Callable[[ConversationManager], Awaitable[R]]
    ) -> concurrent.futures.Future[R]:
        """Start ``fn(manager)`` on the engine's loop and return at once.

        For async code on another loop: ``await asyncio.wrap_future(submit(fn))``
        waits without blocking that loop.
        """
        self._check_usable()
        return self._portal.start_task_soon(fn, self._manager)

    @property
    def closed(self) -> bool:
        """Whether calls are refused: closed, or this process is a fork of its builder's."""
        return self._closed or os.getpid() != self._pid

    def close(self, timeout: float | None = 30.0) -> None:
        """Flush every pending write (bounded by ``timeout``), close the client, stop the thread.

        Raises ``DrainTimeout`` (after stopping all the same) when Redis did not
        confirm everything in time. Closing twice is a no-op, and so is closing
        in a forked child (the engine thread and its writes are the parent's).
        """
        flushing = self._begin_close(timeout)
        if flushing is not None:
            self._finish_close(flushing)

    def __enter__(self) -> BlockingConversationManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _await(
        self,
        fn: Callable[Concatenate[ConversationManager, P], Awaitable[R]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Await ``fn(manager, ...)`` on the engine's loop."""

        async def on_loop() -> R:
            return await fn(self._manager, *args, **kwargs)

        return self._portal_call(on_loop)

    def _call(
        self,
        fn: Callable[Concatenate[ConversationManager, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """Call ``fn(manager, ...)`` on the engine's thread."""

        async def on_loop() -> R:
            return fn(self._manager, *args, **kwargs)

        return self._portal_call(on_loop)

    def _pull(self, source: AsyncIterator[R]) -> Generator[R, None, None]:
        """Each item of ``source`` (which lives on the engine's loop), fetched on that loop."""
        try:
            while True:
                try:
                    yield self._portal_call(source.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            closer = getattr(source, "aclose", None)
            if closer is not None and not self._closed:
                self._portal_call(closer)

    def _portal_call(self, fn: Callable[[], Awaitable[R]]) -> R:
        self._check_usable()
        return self._portal.call(fn)

    def _check_usable(self) -> None:
        if os.getpid() != self._pid:
            # The portal's thread was not copied by fork: a call would wait for ever.
            raise ConfigurationError(
                f"this BlockingConversationManager was built in process {self._pid}, "
                f"and this is {os.getpid()}, a fork of it: its engine thread does not "
                "exist here; build a new manager in this process (after the fork)"
            )
        if self._closed:
            raise ConfigurationError("this BlockingConversationManager is closed")
        if threading.current_thread() is self._thread:
            raise ConfigurationError(
                "a BlockingConversationManager was called from its engine's own thread "
                "(inside run() or submit()), where a blocking call would wait for itself: "
                "use the ConversationManager that run() passes in, and await it"
            )

    def _begin_close(self, timeout: float | None) -> concurrent.futures.Future[None] | None:
        """Mark closed and start the flush; None when there is nothing to close here."""
        if os.getpid() != self._pid:
            self._closed = True
            return None
        with self._lock:
            if self._closed:
                return None
            self._closed = True
        try:
            return self._portal.start_task_soon(self._manager.aclose, timeout)
        except BaseException:
            self._release()
            raise

    def _finish_close(self, flushing: concurrent.futures.Future[None]) -> None:
        """Wait for the flush, then close the client and stop the thread (whatever happened)."""
        try:
            flushing.result()
        finally:
            self._release()

    def _release(self) -> None:
        try:
            if self._client is not None:
                self._portal.call(self._client.aclose)
        finally:
            self._stop()

    def _stop(self) -> None:
        _OPEN.discard(self)
        self._portal.call(self._portal.stop)
        self._thread.join()


def _start_portal() -> tuple[BlockingPortal, threading.Thread, asyncio.AbstractEventLoop]:
    """anyio's blocking portal, served by a daemon thread.

    ``anyio.from_thread.start_blocking_portal`` runs it on a ThreadPoolExecutor
    worker, which the interpreter joins at exit BEFORE ``atexit`` handlers run:
    a script that never called ``close()`` would hang on exit. A daemon thread
    lets the ``atexit`` hook below flush and stop it instead.
    """
    ready: concurrent.futures.Future[tuple[BlockingPortal, asyncio.AbstractEventLoop]]
    ready = concurrent.futures.Future()

    async def serve() -> None:
        async with BlockingPortal() as portal:
            ready.set_result((portal, asyncio.get_running_loop()))
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(serve, backend="asyncio")
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=run, name="conversation-engine", daemon=True)
    thread.start()
    portal, loop = ready.result()
    return portal, thread, loop


# Managers not closed yet, held until they are: the program's exit flushes them
# (a script that ends without close() loses nothing it was told was written, and
# does not hang). A strong reference, as a running thread is one anyway: a
# manager dropped unclosed still has its writes flushed at exit.
_OPEN: set[BlockingConversationManager] = set()


def _forget_parents_managers() -> None:
    """In a forked child: the parent's managers are not this process's to flush at exit.

    Their loops are marked closed here without closing them: the child shares
    the parent's epoll instance, and closing (or collecting) a live loop
    unregisters its sockets from it, which stalled the PARENT's engine (its
    replies were never read). A closed loop's ``__del__`` and its transports'
    removals do nothing; the child's copies of the file descriptors are only
    closed, which leaves the parent's open.
    """
    inherited = list(_OPEN)
    _OPEN.clear()  # first: whatever happens below, the child's exit never waits on them
    for manager in inherited:
        try:
            manager._loop._closed = True  # type: ignore[attr-defined]
        except AttributeError:  # a loop implementation without the flag (uvloop)
            logger.debug("cannot mark an inherited engine loop closed: %r", manager._loop)


os.register_at_fork(after_in_child=_forget_parents_managers)


@atexit.register
def _close_at_exit() -> None:
    # Every flush starts before any is waited for (on each manager's own thread):
    # with Redis down, exit takes the longest exit_timeout, not the sum of them.
    flushing: list[tuple[BlockingConversationManager, concurrent.futures.Future[None]]] = []
    for manager in list(_OPEN):
        try:
            started = manager._begin_close(manager._exit_timeout)
        except Exception:
            logger.exception("flushing a BlockingConversationManager at exit failed")
            continue
        if started is not None:
            flushing.append((manager, started))
    for manager, started in flushing:
        try:
            manager._finish_close(started)
        except Exception:  # one manager's failed flush must not keep the others open
            logger.exception("flushing a BlockingConversationManager at exit failed")
