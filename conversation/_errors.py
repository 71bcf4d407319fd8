"""Errors raised by the engine.

The tree::

    ConversationError                 base of everything raised on purpose
    ├── InvalidRoomId                 a room id that cannot be stored safely
    ├── InvalidMessage                a role, content, id or tag the engine refuses
    ├── InvalidCursor                 a change-feed cursor that is not one (or not this room's)
    ├── InvalidExport                 an export file that is damaged, foreign or too new
    ├── RoomNotEmpty                  import_room into a room that holds entries (no replace)
    ├── PersistError                  Redis did not confirm a write
    │   ├── DurabilityError           a durable write could not be confirmed
    │   ├── ReplicationTimeout        fewer replicas than min_replicas confirmed a write
    │   ├── DrainTimeout              shutdown could not flush every write in time
    │   └── BacklogFull               a room already has max_pending_writes waiting
    ├── RedisUnavailable              a read that needs Redis could not reach it
    ├── ConsolidationError            a summary could not be made; the room is unchanged
    ├── ConfigurationError            the manager was built with unusable settings
    ├── TemplateError                 a prompt template failed to load or render
    └── SessionError                  the sessions service refused a call
        ├── InvalidSessionId          a user or session id that cannot be stored safely
        ├── SessionExists             create_session with the id of a live session
        └── SessionNotFound           no live session (or a forged/stale handle)

Backend errors are chained with ``raise ... from``, so the redis-py or Jinja
exception that caused one stays reachable as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BacklogFull",
    "ConfigurationError",
    "ConsolidationError",
    "ConversationError",
    "DrainTimeout",
    "DurabilityError",
    "InvalidCursor",
    "InvalidExport",
    "InvalidMessage",
    "InvalidRoomId",
    "InvalidSessionId",
    "PersistError",
    "RedisUnavailable",
    "ReplicationTimeout",
    "RoomNotEmpty",
    "SessionError",
    "SessionExists",
    "SessionNotFound",
    "TemplateError",
]


class ConversationError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRoomId(ConversationError, ValueError):
    """A room id that would break key layout or cluster slotting."""

    def __init__(self, room_id: object, reason: str) -> None:
        self.room_id = room_id
        self.reason = reason
        super().__init__(f"invalid room id {room_id!r:.80}: {reason}")


class InvalidMessage(ConversationError, ValueError):
    """A message the engine refuses to store; nothing already stored changes."""

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        self.reason = reason
        self.field = field
        where = f" ({field})" if field else ""
        super().__init__(f"invalid message{where}: {reason}")


class InvalidCursor(ConversationError, ValueError):
    """A change-feed cursor that this engine did not make, or made for another room."""

    def __init__(self, cursor: object, reason: str) -> None:
        self.cursor = cursor
        self.reason = reason
        super().__init__(f"invalid change cursor {cursor!r:.60}: {reason}")


class InvalidExport(ConversationError, ValueError):
    """Data given to ``import_room``/``import_session`` that is not an export of this engine."""

    def __init__(self, reason: str, *, where: str = "") -> None:
        self.reason = reason
        self.where = where
        super().__init__(
            f"not an importable export: {reason}" + (f" (at {where})" if where else "")
        )


class RoomNotEmpty(ConversationError):
    """``import_room`` refused a room that holds entries (pass ``replace=True``)."""

    def __init__(self, room_id: str, entries: int) -> None:
        self.room_id = room_id
        self.entries = entries
        super().__init__(
            f"room {room_id!r:.80} holds {entries} entries: import_room(..., replace=True) "
            "replaces them"
        )


class PersistError(ConversationError):
    """Redis did not confirm a write.

    ``idempotency_key``, when set, names the write: re-sending it with
    ``append_async(..., idempotency_key=err.idempotency_key)`` lands it exactly
    once, whether or not the first attempt reached Redis.
    """

    def __init__(
        self, message: str, *, room_id: str | None = None, idempotency_key: str | None = None
    ) -> None:
        self.room_id = room_id
        self.idempotency_key = idempotency_key
        super().__init__(message)


class DurabilityError(PersistError):
    """A ``durable=True`` write could not be confirmed before its deadline.

    The turn has been taken out of this worker's memory and will not be retried
    in the background. Redis may or may not hold it (a timeout is ambiguous):
    call ``append_async`` again with ``idempotency_key=err.idempotency_key`` and
    it lands exactly once.
    """

    idempotency_key: str

    def __init__(self, message: str, *, room_id: str, idempotency_key: str) -> None:
        super().__init__(message, room_id=room_id, idempotency_key=idempotency_key)


class ReplicationTimeout(PersistError):
    """``WAIT`` saw fewer replicas than ``min_replicas`` confirm a write in time.

    The write is not acknowledged: the primary may hold it (WAIT is no rollback),
    so the engine retries it under the same idempotency token until enough
    replicas confirm it. A durable write reports this as the ``__cause__`` of its
    ``DurabilityError``. ``replicas`` is how many confirmed, ``wanted`` how many
    were asked for.
    """

    def __init__(self, *, replicas: int, wanted: int, timeout_ms: int) -> None:
        self.replicas = replicas
        self.wanted = wanted
        super().__init__(
            f"{replicas} of {wanted} replica(s) confirmed the write within {timeout_ms} ms"
        )


class DrainTimeout(PersistError):
    """``drain``/``aclose`` ran out of time; ``unflushed`` maps room id to pending writes."""

    def __init__(self, unflushed: dict[str, int]) -> None:
        self.unflushed = unflushed
        total = sum(unflushed.values())
        super().__init__(f"{total} write(s) in {len(unflushed)} room(s) were not flushed to Redis")


class BacklogFull(PersistError):
    """The room already holds ``limit`` writes that Redis has not confirmed.

    Raised by the write that would exceed ``max_pending_writes``; it changed
    nothing, in memory or in Redis. The queue drains once Redis answers again.
    """

    def __init__(self, room_id: str, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"room {room_id}: {limit} write(s) are already waiting for Redis "
            f"(max_pending_writes={limit}); this write was refused",
            room_id=room_id,
        )


class RedisUnavailable(ConversationError):
    """A read that must consult Redis (``ensure_fresh_from_redis``) could not."""

    def __init__(self, message: str, *, room_id: str | None = None) -> None:
        self.room_id = room_id
        super().__init__(message)


class ConsolidationError(ConversationError):
    """Consolidation failed before the fold (summariser error, bad summary, template).

    Nothing in the room changed; the summariser's own exception is ``__cause__``.
    """

    def __init__(self, message: str, *, room_id: str) -> None:
        self.room_id = room_id
        super().__init__(message)


class ConfigurationError(ConversationError, ValueError):
    """The manager or renderer was constructed with settings it cannot work with."""


class TemplateError(ConversationError):
    """A prompt template could not be found, compiled or rendered.

    ``template`` and ``lineno`` name the file and line where Jinja located the
    problem, when it did.
    """

    def __init__(self, message: str, *, template: str | None = None, lineno: int | None = None):
        self.template = template
        self.lineno = lineno
        super().__init__(message)


class SessionError(ConversationError):
    """Base of every error the sessions service raises on purpose."""


class InvalidSessionId(SessionError, ValueError):
    """A user id or session id that would break key layout or cluster slotting."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field} {value!r:.80}: {reason}")


class SessionExists(SessionError):
    """``create_session`` was given the id of a live session of that user."""

    def __init__(self, user_id: str, session_id: str) -> None:
        self.user_id = user_id
        self.session_id = session_id
        super().__init__(f"user {user_id!r:.80} already has a session {session_id!r:.80}")


class SessionNotFound(SessionError, LookupError):
    """No live session: never created, deleted, expired — or a forged or stale handle.

    The same error covers a ``Session`` whose handle does not match the stored
    session, so a caller cannot learn whether another user's session exists.
    """

    def __init__(self, user_id: str, session_id: str) -> None:
        self.user_id = user_id
        self.session_id = session_id
        super().__init__(
            f"no live session {session_id!r:.80} for user {user_id!r:.80} (never created, "
            "deleted or expired, or the Session object was not issued by this store for it)"
        )


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of a backend error (redis-py 8's repr() hides the message)."""
    return f"{type(exc).__name__}: {exc}"


def require_positive_int(name: str, value: object) -> None:
    """A setting that must be an int of at least 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a positive int, got {value!r}")
