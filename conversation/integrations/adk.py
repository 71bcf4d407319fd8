"""A Google ADK session service backed by the engine's ``SessionStore`` (extra ``adk``).

``EngineSessionService(redis)`` is a ``google.adk.sessions.BaseSessionService``:
sessions with their events and state, shared by every worker through Redis.
It keeps nothing of its own in this process; each call reads or writes Redis.

ADK names a session by ``(app_name, user_id, session_id)`` and scopes state by
key prefix: ``app:`` keys are shared by every user of the app, ``user:`` keys by
every session of one user of the app, ``temp:`` keys live only in the session
object of the current invocation (never stored), and other keys belong to the
session. They map onto the store like this:

- the store's user (owner) is ``<app>:<user>``, the app name with ``%`` and
  ``:`` percent-encoded so that no two (app, user) pairs share an owner; all of
  one user's sessions and their ``user:`` state share that hash tag (one slot);
- each ADK session is a store session of that owner; each event is one of its
  rows, ``{"role": "user"|"assistant", "content": [{"type": "x-adk-event",
  "event": <the Event as JSON>}]}`` (role ``user`` for events authored by the
  user), in the order Redis received them from all workers;
- session state is the store session's state, ``user:`` state the owner's
  state, written in the same script as the event they came with;
- ``app:`` state is the state of the store *group* named after the app (its own
  hash tag), which also records the app's live users, so ``list_sessions``
  without a user id needs no keyspace scan.

See docs/integrations.md for the guarantees and the choices made.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.sessions.base_session_service import (
    BaseSessionService,
    GetSessionConfig,
    ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State
from pydantic_core import to_jsonable_python
from typing_extensions import override

from .._errors import (
    ConfigurationError,
    InvalidMessage,
    InvalidSessionId,
    SessionExists,
    SessionNotFound,
)
from .._manager import ConversationManager
from .._sessions.store import SessionStore
from ..blocking import BlockingConversationManager

__all__ = ["EVENT_PART", "EngineSessionService"]

logger = logging.getLogger(__name__)

#: The content-part type that carries one whole ADK event.
EVENT_PART: Final = "x-adk-event"
#: The key family of ADK's keys: ``{prefix}:adk:{<app>:<user>}:...``.
KEY_FAMILY: Final = "adk"

P = ParamSpec("P")
R = TypeVar("R")


def _on_engine(
    method: Callable[Concatenate[EngineSessionService, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[EngineSessionService, P], Coroutine[Any, Any, R]]:
    """Run the method on the service's own loop thread when it has one (``from_url``)."""

    @functools.wraps(method)
    async def call(self: EngineSessionService, /, *args: P.args, **kwargs: P.kwargs) -> R:
        engine = self._engine
        if engine is None:
            return await method(self, *args, **kwargs)

        async def work(_: ConversationManager) -> R:
            return await method(self, *args, **kwargs)

        return await asyncio.wrap_future(engine.submit(work))

    return call


class EngineSessionService(BaseSessionService):
    """ADK sessions, events and scoped state in Redis, shared by every worker.

    ``redis`` is any ``redis.asyncio`` client (``None``: this process's memory
    only, for tests). ``idle_ttl_seconds``: a session nobody reads or writes
    expires after this long (default 30 days; every use restarts it), and app
    and user state expire the same time after the last use of the app or user.
    ``max_events``: the oldest events of a longer session fall off (default
    10,000). The other settings are ``SessionStore``'s.

    Built on a client, the service runs on the caller's event loop (one loop
    at a time; after ``asyncio.run`` ends, the next loop may take it over).
    ``from_url`` builds it on a private loop thread instead
    (``conversation.blocking``'s portal), so any loop of any thread may call
    it, several at once: ADK's sync ``Runner.run`` starts a new loop in a new
    thread per call.
    """

    _engine: BlockingConversationManager | None = None
    _client: Any = None

    def __init__(
        self,
        redis: Any = None,
        *,
        key_prefix: str = "sg",
        idle_ttl_seconds: float = 30 * 24 * 3600,
        max_events: int = 10_000,
        max_event_bytes: int = 8 * 1024 * 1024,
        command_timeout: float | None = 10.0,
    ) -> None:
        self.store = SessionStore(
            redis,
            key_prefix=key_prefix,
            idle_ttl_seconds=idle_ttl_seconds,
            max_messages=max_events,
            max_message_bytes=max_event_bytes,
            command_timeout=command_timeout,
            key_family=KEY_FAMILY,
        )

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> EngineSessionService:
        """A service on a new ``redis.asyncio`` client for ``url``, on its own loop thread."""
        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"a Redis URL is a non-empty string, got {url!r:.80}")
        engine = BlockingConversationManager(None)  # the loop thread; its manager is unused

        async def build(_: ConversationManager) -> EngineSessionService:
            client = aioredis.Redis.from_url(url)
            service = cls(client, **settings)
            service._client = client
            return service

        try:
            service = engine.run(build)
        except BaseException:
            engine.close()
            raise
        service._engine = engine
        return service

    async def close(self) -> None:
        """Close what ``from_url`` built (the client, the loop thread); else nothing."""
        engine, self._engine = self._engine, None
        if engine is None or engine.closed:
            return
        client = self._client

        async def close_client(_: ConversationManager) -> None:
            if client is not None:
                await client.aclose()

        try:
            await asyncio.wrap_future(engine.submit(close_client))
        finally:
            await asyncio.to_thread(engine.close)

    # ---------------------------------------------------------------- sessions

    @override
    @_on_engine
    async def create_session(
        self,
        *,
        app_name: str,
        user_id: str,
        state: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> Session:
        owner = _owner(app_name, user_id)
        sid = session_id.strip() if session_id else None
        app_delta, user_delta, session_delta = _split(state)
        try:
            created = await self.store.create_session(
                owner, sid or None, state=session_delta, owner_state=user_delta
            )
        except SessionExists as exc:
            raise AlreadyExistsError(f"Session with id {sid} already exists.") from exc
        group, user_state = await asyncio.gather(
            self.store.use_group(_app(app_name), member=owner, state=app_delta),
            self.store.get_owner_state(owner),
        )
        return Session(
            id=created.session_id,
            app_name=app_name,
            user_id=user_id,
            state=_merge(group.state, user_state, created.state),
            last_update_time=created.created_at,
        )

    @override
    @_on_engine
    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        owner = _owner(app_name, user_id)
        sid = session_id.strip() if session_id else session_id
        wanted = config.num_recent_events if config is not None else None
        # The latest event is read even for num_recent_events=0: its timestamp is
        # the session's last_update_time.
        stored, group = await asyncio.gather(
            self.store.get_session(owner, sid, last=None if wanted is None else max(wanted, 1)),
            self.store.use_group(_app(app_name), member=owner),
        )
        if stored is None:
            return None
        events = _events(stored.messages, owner, sid)
        updated = events[-1].timestamp if events else stored.created_at
        if wanted == 0:
            events = []
        if config is not None and config.after_timestamp is not None:
            after = config.after_timestamp
            events = [e for e in events if e.timestamp >= after]
        return Session(
            id=sid,
            app_name=app_name,
            user_id=user_id,
            state=_merge(group.state, stored.owner_state, stored.state),
            events=events,
            last_update_time=updated,
        )

    @override
    @_on_engine
    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        """Sessions without events, with merged state, oldest update first.

        Without ``user_id``: every live user of the app, as the app's group
        records them (never a keyspace scan). Listing refreshes no TTL.
        """
        group = await self.store.use_group(_app(app_name), list_members=user_id is None)
        prefix = _app(app_name) + ":"
        if user_id is not None:
            owners = {_owner(app_name, user_id): user_id}
        else:
            owners = {m: m[len(prefix) :] for m in group.members if m.startswith(prefix)}
        listed = await asyncio.gather(*(self.store.list_sessions(o) for o in owners))
        peeks = await asyncio.gather(
            *(
                self.store.get_session(info.user_id, info.session_id, last=1, refresh=False)
                for infos in listed
                for info in infos
            )
        )
        sessions = [
            Session(
                id=peek.session_id,
                app_name=app_name,
                user_id=owners[peek.user_id],
                state=_merge(group.state, peek.owner_state, peek.state),
                last_update_time=_last_update(peek.messages, peek.created_at),
            )
            for peek in peeks
            if peek is not None  # deleted or expired between the list and the read
        ]
        sessions.sort(key=lambda s: (s.last_update_time, s.user_id, s.id))
        return ListSessionsResponse(sessions=sessions)

    @override
    @_on_engine
    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        sid = session_id.strip() if session_id else session_id
        await self.store.delete_session(_owner(app_name, user_id), sid)

    @override
    @_on_engine
    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        return await self.store.get_owner_state(_owner(app_name, user_id))

    # ------------------------------------------------------------------ events

    @override
    @_on_engine
    async def append_event(self, session: Session, event: Event) -> Event:
        """Store the event and its state delta (``temp:`` keys only in ``session``).

        The event, its session-scoped and its ``user:`` delta land in one
        script, once: appending an equal event again (a retry) stores nothing
        twice. ``app:`` deltas follow in the app's own script. Raises
        ``SessionNotFoundError`` when the session is not live (nothing stored).
        """
        if event.partial:
            return event
        if any(e == event for e in session.events if e.id == event.id):
            return event  # an equal re-delivery: already stored and applied
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        app_delta, user_delta, session_delta = _split(event.actions.state_delta)
        row = _row(event)
        owner = _owner(session.app_name, session.user_id)
        # Equal events share the key, so a retried call lands once; distinct
        # events that share an id (tests stamp fixed ids) do not.
        key = "adk:" + hashlib.sha256(orjson.dumps(row)).hexdigest()
        try:
            await self.store.append_by_id(
                owner,
                session.id,
                row,
                state=session_delta,
                owner_state=user_delta,
                idempotency_key=key,
            )
        except SessionNotFound as exc:
            raise SessionNotFoundError(f"Session {session.id} not found.") from exc
        await self.store.use_group(_app(session.app_name), member=owner, state=app_delta)
        self._commit_event_to_session(session, event)
        session.last_update_time = event.timestamp
        return event


# ------------------------------------------------------------------ mapping


def _app(app_name: str) -> str:
    """The app's group name: ``%`` and ``:`` percent-encoded, so it holds no colon.

    The store checks the rest (no braces, control characters or lone surrogates;
    length) when it builds a key from it.
    """
    _require_name("app_name", app_name)
    return app_name.replace("%", "%25").replace(":", "%3A")


def _owner(app_name: str, user_id: str) -> str:
    """The store owner of an ADK user: one per (app, user), never shared by two pairs."""
    _require_name("user_id", user_id)
    return f"{_app(app_name)}:{user_id}"


def _require_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidSessionId(what, value, "must be a non-empty str")


def _split(
    state: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A state dict's app, user and session parts (prefixes removed); temp keys dropped.

    Values are stored as ADK's database service stores them: converted to JSON
    data (datetimes, pydantic models, bytes...) by pydantic.
    """
    app: dict[str, Any] = {}
    user: dict[str, Any] = {}
    own: dict[str, Any] = {}
    if not state:
        return app, user, own
    try:
        safe = to_jsonable_python(state)
    except Exception as exc:  # pydantic raises its own error types for unknown values
        raise InvalidMessage(f"state is not JSON-serialisable: {exc}", field="state") from exc
    for key, value in safe.items():
        if key.startswith(State.APP_PREFIX):
            app[key.removeprefix(State.APP_PREFIX)] = value
        elif key.startswith(State.USER_PREFIX):
            user[key.removeprefix(State.USER_PREFIX)] = value
        elif not key.startswith(State.TEMP_PREFIX):
            own[key] = value
    return app, user, own


def _merge(app: dict[str, Any], user: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    merged = dict(own)
    merged.update((State.APP_PREFIX + k, v) for k, v in app.items())
    merged.update((State.USER_PREFIX + k, v) for k, v in user.items())
    return merged


def _row(event: Event) -> dict[str, Any]:
    data = event.model_dump(mode="json", exclude_none=True, by_alias=False)
    role = "user" if event.author == "user" else "assistant"
    return {"role": role, "content": [{"type": EVENT_PART, "event": data}]}


def _last_update(messages: list[dict[str, Any]], created_at: float) -> float:
    """A session's last_update_time: its latest event's timestamp, as ADK's own services keep it."""
    events = _events(messages, "", "")
    return events[-1].timestamp if events else created_at


def _events(messages: list[dict[str, Any]], owner: str, session_id: str) -> list[Event]:
    events: list[Event] = []
    for message in messages:
        content = message.get("content")
        part = content[0] if isinstance(content, list) and len(content) == 1 else None
        if not isinstance(part, dict) or part.get("type") != EVENT_PART:
            logger.warning(
                "owner %s: session %s holds a row that is no ADK event; skipped", owner, session_id
            )
            continue
        try:
            events.append(Event.model_validate(part["event"]))
        except ValueError:
            logger.warning(
                "owner %s: session %s holds an event ADK cannot read; skipped", owner, session_id
            )
    return events
