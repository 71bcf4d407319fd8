"""Sessions service (SPEC §4.19): per-user chat sessions with idle expiry.

A session is an ordered list of OpenAI-chat messages owned by one user, as
agent runtimes expose them. ``SessionStore`` keeps them in Redis (or in this
process's memory when ``redis`` is None)::

    {prefix}:session:{<user_id>}:index            ZSET session id -> expiry deadline (ms)
    {prefix}:session:{<user_id>}:seq              STRING creation counter
    {prefix}:session:{<user_id>}:meta:<session>   HASH user, sid, token, seq, created, ...
    {prefix}:session:{<user_id>}:msgs:<session>   LIST orjson rows, oldest first
    {prefix}:session:{<user_id>}:idem:<session>   ZSET ids of the last 64 appends applied

Every key is built from the user id and shares its hash tag, so one user's
index and sessions live in one cluster slot and each script touches one slot;
no operation can name another user's keys. ``list_sessions`` answers from the
index, never by scanning the keyspace.

Idle expiry is the keys' TTL, refreshed by every use of a session: creating,
appending, and reading it (``get_session``) — a session an agent keeps reading
must not expire under it. ``list_sessions`` and ``delete_session`` do not
refresh anything. The index score of a session is the absolute deadline its
keys expire at (server clock), so pruning expired members is exact.

A ``Session`` carries an unguessable handle token issued at creation; the
append script compares it with the stored one, so a ``Session`` built or
altered by hand (another user's id, a guessed session id, a handle kept
across a delete and re-create) cannot write.

redis-py retries a command after a connection error or timeout, and the first
attempt may have landed: every create carries a fresh token and every append a
fresh write id, so a retried call is recognised and applied once.

Its errors are the ``SessionError`` branch of the tree in ``_errors.py``.
Backend failures are the engine's: ``PersistError`` for a write Redis did not
confirm, ``RedisUnavailable`` for a read, each raised ``from`` the redis-py error.
"""

from __future__ import annotations

import logging
import math
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from redis.exceptions import RedisError

from .._entries import ROLES, build_entry, content_may_be_null, encode
from .._errors import (
    ConfigurationError,
    InvalidExport,
    InvalidMessage,
    InvalidRoomId,
    InvalidSessionId,
    PersistError,
    RedisUnavailable,
    SessionExists,
    SessionNotFound,
    describe_error,
)
from .._redis.keys import validate_room_id
from .._redis.sessions import (
    IDEM_CAP,
    SPLICE_OPS,
    Forged,
    RedisSessions,
    SessionKeySpace,
    Spliced,
)
from .memory import MemorySessions

logger = logging.getLogger(__name__)

MAX_USER_ID_BYTES: Final = 512
MAX_SESSION_ID_BYTES: Final = 256
MESSAGE_FIELDS: Final = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})
MAX_IDEMPOTENCY_KEY_CHARS: Final = 128
# How a caller's idempotency key is stored among the append ids (generated ids
# are URL-safe base64, which has no ':').
_CALLER_KEY: Final = "k:"
SESSION_FORMAT: Final = "conversation-session"
SESSION_FORMAT_VERSION: Final = 1
#: The most messages an import checks (or max_messages, if larger).
MAX_IMPORT_MESSAGES: Final = 10_000
_BACKEND_ERRORS: Final = (RedisError, OSError, TimeoutError)

Message = dict[str, Any]

# ---------------------------------------------------------------- public data


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session without its messages, as ``list_sessions`` returns it.

    Times are Unix seconds by the Redis server's clock (this process's clock
    when memory-only). ``updated_at`` moves on writes; ``expires_at`` moves on
    every use, reads included.
    """

    user_id: str
    session_id: str
    created_at: float
    updated_at: float
    expires_at: float
    message_count: int


@dataclass(frozen=True, slots=True)
class Session(SessionInfo):
    """A session with its messages: a snapshot as of the call that returned it.

    ``messages`` is a fresh, caller-owned list (changing it changes nothing
    stored). ``append_message`` does not update it; ``get_session`` again to
    see other writers' messages. The handle token is private: a ``Session``
    built by hand, or copied with another user or session id, cannot write.
    """

    messages: list[Message]
    _token: str = field(repr=False, compare=False)
    #: The session's own state (key -> JSON value), as of this snapshot.
    state: dict[str, Any] = field(default_factory=dict)
    #: The owning user's state, shared by all of their sessions, as of this snapshot.
    owner_state: dict[str, Any] = field(default_factory=dict)

    @property
    def info(self) -> SessionInfo:
        return SessionInfo(
            self.user_id,
            self.session_id,
            self.created_at,
            self.updated_at,
            self.expires_at,
            self.message_count,
        )


@dataclass(frozen=True, slots=True)
class GroupState:
    """What ``SessionStore.use_group`` returns: the group's state, and its live members."""

    state: dict[str, Any]
    members: list[str]


# ------------------------------------------------------------------ validation


def validate_user_id(user_id: object) -> str:
    return _validate_id("user_id", user_id, MAX_USER_ID_BYTES)


def validate_session_id(session_id: object) -> str:
    return _validate_id("session_id", session_id, MAX_SESSION_ID_BYTES)


def _validate_id(what: str, value: object, max_bytes: int) -> str:
    """Room-id rules (no braces, no control characters, valid Unicode), own length cap."""
    try:
        text = validate_room_id(value)
    except InvalidRoomId as exc:
        raise InvalidSessionId(what, value, exc.reason) from exc
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidSessionId(what, value, f"is {size} bytes; the limit is {max_bytes}")
    return text


def state_rows(delta: object, max_bytes: int) -> dict[str, bytes]:
    """Validate a state delta (str keys, JSON values); its stored form, key -> orjson."""
    if delta is None:
        return {}
    if not isinstance(delta, Mapping):
        raise InvalidMessage(f"must be a mapping, not {type(delta).__name__}", field="state")
    rows: dict[str, bytes] = {}
    for key, value in delta.items():
        if not isinstance(key, str):
            raise InvalidMessage(f"keys must be str, not {type(key).__name__}", field="state")
        try:
            key.encode("utf-8")
            row = orjson.dumps(value)
        except UnicodeEncodeError as exc:
            raise InvalidMessage(f"key {key!r:.80} is not valid Unicode", field="state") from exc
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise InvalidMessage(f"value of {key!r:.80} is not JSON: {exc}", field="state") from exc
        if len(row) > max_bytes:
            raise InvalidMessage(
                f"value of {key!r:.80} is {len(row)} bytes; the limit is {max_bytes}",
                field="state",
            )
        rows[key] = row
    return rows


def message_row(message: object, max_bytes: int) -> bytes:
    """Validate one OpenAI-chat message like the engine's entries; its stored row.

    Rows start with ``{"role":`` so the scripts recognise tool results without
    decoding JSON. Fields other than ``role``, ``content``, ``name``,
    ``tool_calls`` and ``tool_call_id`` are refused unless they are None.
    """
    if not isinstance(message, Mapping):
        raise InvalidMessage(f"must be a mapping, not {type(message).__name__}")
    unknown = sorted(
        str(key)
        for key, value in message.items()
        if key not in MESSAGE_FIELDS and value is not None
    )
    if unknown:
        raise InvalidMessage(f"unknown field(s) {unknown!r:.200}", field=unknown[0])
    if "role" not in message:
        raise InvalidMessage(f"is missing; one of {sorted(ROLES)}", field="role")
    if "content" not in message:
        raise InvalidMessage("is missing", field="content")
    entry = build_entry(
        message["role"],
        message["content"],
        name=message.get("name"),
        tool_calls=message.get("tool_calls"),
        tool_call_id=message.get("tool_call_id"),
    )
    del entry["message_id"]  # the engine's identity field: sessions have none
    return encode(entry, max_bytes)


# ------------------------------------------------------------------ the store


class SessionStore:
    """Per-user chat sessions with idle expiry, shared by worker processes through Redis.

    ``redis`` is any ``redis.asyncio`` client (``Redis``, ``RedisCluster``,
    ``Sentinel.master_for``); ``None`` keeps sessions in this process's memory.
    ``idle_ttl_seconds`` is how long an unused session lives; every create,
    append and read restarts it. ``max_messages`` caps each session: the oldest
    messages fall off (never leaving a leading tool result without its call).
    """

    def __init__(
        self,
        redis: Any = None,
        *,
        key_prefix: str = "sg",
        idle_ttl_seconds: float = 1800,
        max_messages: int = 200,
        max_message_bytes: int = 8 * 1024 * 1024,
        command_timeout: float | None = 10.0,
        key_family: str = "session",
    ) -> None:
        if (
            isinstance(idle_ttl_seconds, bool)
            or not isinstance(idle_ttl_seconds, (int, float))
            or not math.isfinite(idle_ttl_seconds)
            or idle_ttl_seconds <= 0
        ):
            raise ConfigurationError(
                f"idle_ttl_seconds must be a positive number, got {idle_ttl_seconds!r}"
            )
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise ConfigurationError(f"max_messages must be a positive int, got {max_messages!r}")
        if max_message_bytes < 1:
            raise ConfigurationError(
                f"max_message_bytes must be positive, got {max_message_bytes!r}"
            )
        self.idle_ttl_seconds = float(idle_ttl_seconds)
        self.max_messages = max_messages
        if not isinstance(key_family, str) or not key_family.isidentifier():
            raise ConfigurationError(
                f"key_family must be a short identifier such as 'session', got {key_family!r}"
            )
        self.keys = SessionKeySpace(key_prefix, key_family)
        self._max_message_bytes = max_message_bytes
        ttl_ms = max(1, round(idle_ttl_seconds * 1000))
        self._backend: RedisSessions | MemorySessions = (
            RedisSessions(
                redis, self.keys, ttl_ms=ttl_ms, cap=max_messages, command_timeout=command_timeout
            )
            if redis is not None
            else MemorySessions(ttl_ms=ttl_ms, cap=max_messages)
        )

    # ------------------------------------------------------------- lifecycle

    async def create_session(
        self,
        user_id: str,
        session_id: str | None = None,
        *,
        state: Mapping[str, Any] | None = None,
        owner_state: Mapping[str, Any] | None = None,
    ) -> Session:
        """Start an empty session; ``session_id=None`` generates one.

        ``state`` is the new session's initial state; ``owner_state`` is written
        into the user's state (shared by their sessions) in the same step. Keys
        are strings, values anything JSON can hold.

        Raises ``SessionExists`` when the user already has a live session with
        that id (an expired or deleted id may be reused); then nothing is written.
        """
        user_id = validate_user_id(user_id)
        generated = session_id is None
        sid = uuid.uuid4().hex if session_id is None else validate_session_id(session_id)
        state_delta = state_rows(state, self._max_message_bytes)
        owner_delta = state_rows(owner_state, self._max_message_bytes)
        for _attempt in range(3):
            token = secrets.token_urlsafe(18)
            try:
                created = await self._backend.create(user_id, sid, token, state_delta, owner_delta)
            except _BACKEND_ERRORS as exc:
                raise PersistError(
                    f"user {user_id}: creating session {sid} was not confirmed: "
                    + describe_error(exc)
                ) from exc
            if created is not None:
                logger.debug("user %s: created session %s", user_id, sid)
                return Session(
                    user_id,
                    sid,
                    created.created_ms / 1000,
                    created.created_ms / 1000,
                    created.deadline_ms / 1000,
                    0,
                    [],
                    token,
                    _decode_state(state_delta),
                    # The user's whole state is what a get_session shows; a create
                    # answers with the part it wrote (read the rest with get_owner_state).
                    _decode_state(owner_delta),
                )
            if not generated:
                break
            sid = uuid.uuid4().hex  # a 122-bit collision: astronomically rare, but never fatal
        raise SessionExists(user_id, sid)

    async def get_session(
        self,
        user_id: str,
        session_id: str,
        *,
        last: int | None = None,
        refresh: bool = True,
    ) -> Session | None:
        """The session with its messages, or None; refreshes its idle TTL.

        ``last``: only the latest N messages (``message_count`` still counts all
        that are read; 0 reads none, for state and times only). ``refresh=False``
        reads without counting as a use (the TTL does not move), as listing does.
        """
        if last is not None and (isinstance(last, bool) or not isinstance(last, int) or last < 0):
            raise ValueError(f"last must be None or an int >= 0, got {last!r}")
        read = await self._read(user_id, session_id, last=last, refresh=refresh)
        return None if read is None else read[0]

    async def _read(
        self,
        user_id: str,
        session_id: str,
        *,
        last: int | None = None,
        refresh: bool = True,
        write_ids: bool = False,
    ) -> tuple[Session, list[str]] | None:
        """``get_session``, and with ``write_ids`` the append ids the session remembers."""
        user_id = validate_user_id(user_id)
        session_id = validate_session_id(session_id)
        try:
            loaded = await self._backend.get(
                user_id, session_id, last=last, touch=refresh, write_ids=write_ids
            )
        except _BACKEND_ERRORS as exc:
            raise RedisUnavailable(
                f"user {user_id}: reading session {session_id} failed: {describe_error(exc)}"
            ) from exc
        if loaded is None:
            return None
        messages = self._decode(user_id, session_id, loaded.rows)
        session = Session(
            user_id,
            session_id,
            loaded.created_ms / 1000,
            loaded.updated_ms / 1000,
            loaded.deadline_ms / 1000,
            len(messages),
            messages,
            loaded.token,
            _decode_state(loaded.state, user_id, session_id),
            _decode_state(loaded.owner_state, user_id, session_id),
        )
        return session, loaded.write_ids

    async def export_session(self, user_id: str, session_id: str) -> dict[str, Any]:
        """The session as a JSON-serialisable dict (format ``conversation-session``);
        ``SessionNotFound`` when there is no live one. Reading refreshes its TTL."""
        read = await self._read(user_id, session_id, write_ids=True)
        if read is None:
            raise SessionNotFound(validate_user_id(user_id), validate_session_id(session_id))
        session, write_ids = read
        return {
            "format": SESSION_FORMAT,
            "format_version": SESSION_FORMAT_VERSION,
            "user_id": session.user_id,
            "session_id": session.session_id,
            "created_at": session.created_at,
            "updated_at": session.updated_at,
            "messages": session.messages,
            # The session's own state; the user's state is shared by all of their
            # sessions, so it is not one session's to carry.
            "state": session.state,
            # The caller keys of its last appends (read with the rows, in one script),
            # so an append retried under its key after the move lands once. The ids
            # generated for keyless appends only guard one call's own retries.
            "idempotency_keys": [
                write_id[len(_CALLER_KEY) :]
                for write_id in write_ids
                if write_id.startswith(_CALLER_KEY)
            ],
            "extensions": {},
        }

    async def import_session(
        self,
        user_id: str,
        data: Mapping[str, Any],
        *,
        session_id: str | None = None,
        replace: bool = False,
    ) -> Session:
        """Write an exported session for ``user_id`` (under ``session_id``, by default
        the exported one) in one script, with a new handle token: handles to a
        session it replaces can no longer write. ``SessionExists`` when a live
        session has that id and ``replace`` is False; ``InvalidExport`` for a
        damaged or foreign export; either way nothing is written."""
        user_id = validate_user_id(user_id)
        sid, created_ms, rows, state, write_ids = self._parse_export(data, session_id)
        token = secrets.token_urlsafe(18)
        try:
            result = await self._backend.import_(
                user_id,
                sid,
                token,
                rows,
                created_ms=created_ms,
                replace=replace,
                state=state,
                write_ids=write_ids,
            )
        except _BACKEND_ERRORS as exc:
            raise PersistError(
                f"user {user_id}: importing session {sid} was not confirmed: " + describe_error(exc)
            ) from exc
        if isinstance(result, int):
            raise SessionExists(user_id, sid)
        session = await self.get_session(user_id, sid)
        if session is None:  # expired or deleted in the instant since: say so
            raise SessionNotFound(user_id, sid)
        return session

    def _parse_export(
        self, data: object, session_id: str | None
    ) -> tuple[str, int, list[bytes], dict[str, bytes], list[str]]:
        if not isinstance(data, Mapping):
            raise InvalidExport(f"an export is a JSON object, not {type(data).__name__}")
        if data.get("format") != SESSION_FORMAT:
            raise InvalidExport(f"format is {data.get('format')!r:.60}, not {SESSION_FORMAT!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidExport(f"format_version {version!r:.40} is not a version number")
        if version > SESSION_FORMAT_VERSION:
            raise InvalidExport(f"format_version {version} was written by a newer engine")
        extensions = data.get("extensions", {})
        if not isinstance(extensions, Mapping) or extensions:
            raise InvalidExport("carries extensions this engine cannot import")
        try:
            sid = validate_session_id(
                session_id if session_id is not None else data.get("session_id")
            )
        except InvalidSessionId as exc:
            raise InvalidExport(str(exc), where="session_id") from exc
        created = data.get("created_at")
        if (
            isinstance(created, bool)
            or not isinstance(created, (int, float))
            or not (0 <= created < 2**40)
        ):
            raise InvalidExport(f"created_at {created!r:.40} is not a Unix time")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise InvalidExport("messages must be a list")
        most = max(self.max_messages, MAX_IMPORT_MESSAGES)
        if len(messages) > most:
            # Refused before checking any: a huge list would hold the event loop
            # and build one Redis command of every row, to keep max_messages.
            raise InvalidExport(
                f"{len(messages)} messages; at most {most} import (this store keeps "
                f"the newest {self.max_messages})"
            )
        rows = []
        for index, message in enumerate(messages):
            try:
                rows.append(message_row(message, self._max_message_bytes))
            except InvalidMessage as exc:
                raise InvalidExport(str(exc), where=f"messages[{index}]") from exc
        try:  # an export from before sessions had state carries none
            state = state_rows(data.get("state", {}), self._max_message_bytes)
        except InvalidMessage as exc:
            raise InvalidExport(str(exc), where="state") from exc
        # An export from before sessions carried keys has none.
        write_ids = _import_keys(data.get("idempotency_keys", []))
        return sid, round(created * 1000), rows, state, write_ids

    async def get_owner_state(self, user_id: str) -> dict[str, Any]:
        """The user's state (shared by their sessions), {} when none; refreshes nothing."""
        user_id = validate_user_id(user_id)
        try:
            rows = await self._backend.owner_state(user_id)
        except _BACKEND_ERRORS as exc:
            raise RedisUnavailable(
                f"user {user_id}: reading the user's state failed: {describe_error(exc)}"
            ) from exc
        return _decode_state(rows, user_id)

    async def use_group(
        self,
        group: str,
        *,
        member: str | None = None,
        state: Mapping[str, Any] | None = None,
        list_members: bool = False,
    ) -> GroupState:
        """Read (and with ``state``, first update) the state a group of users shares.

        A group (an app, for the ADK adapter) is named like a user and lives
        under its own hash tag. Every call is a use: the group's keys live
        ``idle_ttl_seconds`` past the last one. ``member`` records that user as
        live for as long; ``list_members=True`` also returns the live members.
        """
        group = _validate_id("group", group, MAX_USER_ID_BYTES)
        if member is not None:
            member = validate_user_id(member)
        delta = state_rows(state, self._max_message_bytes)
        try:
            got, members = await self._backend.group(
                group, member or "", delta, members=list_members
            )
        except _BACKEND_ERRORS as exc:
            raise PersistError(
                f"group {group}: using the group's state was not confirmed: " + describe_error(exc)
            ) from exc
        return GroupState(_decode_state(got, group), members)

    async def delete_session(self, user_id: str, session_id: str) -> bool:
        """Remove the session; True iff a live one was there."""
        user_id = validate_user_id(user_id)
        session_id = validate_session_id(session_id)
        try:
            deleted = await self._backend.delete(user_id, session_id)
        except _BACKEND_ERRORS as exc:
            raise PersistError(
                f"user {user_id}: deleting session {session_id} was not confirmed: "
                + describe_error(exc)
            ) from exc
        if deleted:
            logger.debug("user %s: deleted session %s", user_id, session_id)
        return deleted

    async def list_sessions(self, user_id: str) -> list[SessionInfo]:
        """The user's live sessions without messages, newest (last created) first.

        Answered from the user's index, never by scanning the keyspace; members
        whose session expired or vanished are pruned from it. TTLs are not
        refreshed: listing is not using a session.
        """
        user_id = validate_user_id(user_id)
        try:
            listed = await self._backend.list(user_id)
        except _BACKEND_ERRORS as exc:
            raise RedisUnavailable(
                f"user {user_id}: listing sessions failed: {describe_error(exc)}"
            ) from exc
        listed.sort(key=lambda s: s.seq, reverse=True)
        return [
            SessionInfo(
                user_id,
                s.session_id,
                s.created_ms / 1000,
                s.updated_ms / 1000,
                s.deadline_ms / 1000,
                s.count,
            )
            for s in listed
        ]

    # ---------------------------------------------------------------- writes

    async def append_message(
        self,
        session: Session,
        message: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
    ) -> SessionInfo:
        """Append one message, or a list of them atomically, to a session.

        ``session`` must be a ``Session`` this store returned (from
        ``create_session`` or ``get_session``) for a session that is still live:
        the stored handle token is checked in the same script that writes, so a
        forged or stale ``Session`` raises ``SessionNotFound`` and writes
        nothing. Every message is validated before anything is sent. Returns
        the session's info after the append; ``session`` itself is not updated.

        A ``PersistError`` (e.g. a timeout) leaves it unknown whether the batch
        landed: pass the same ``idempotency_key`` when calling again and it
        lands once (keys are remembered for the session's last 64 appends).
        """
        if not isinstance(session, Session):
            raise TypeError(f"session must be a Session, not {type(session).__name__}")
        user_id = validate_user_id(session.user_id)
        session_id = validate_session_id(session.session_id)
        token = session._token
        if not isinstance(token, str) or not token:
            raise SessionNotFound(user_id, session_id)
        rows = self._rows(message)
        return await self._append(user_id, session_id, token, idempotency_key, rows)

    async def append_by_id(
        self,
        user_id: str,
        session_id: str,
        message: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        *,
        state: Mapping[str, Any] | None = None,
        owner_state: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> SessionInfo:
        """Append messages (possibly none) and state deltas to the user's session.

        Authorised by the user id alone, like ``append_system_message``: for
        callers whose framework names sessions by ids (no handle). ``state``
        is merged into the session's state and ``owner_state`` into the user's,
        in the same script as the messages: all of it lands once, or none.
        """
        user_id = validate_user_id(user_id)
        session_id = validate_session_id(session_id)
        rows = self._rows(message)
        return await self._append(
            user_id,
            session_id,
            None,
            idempotency_key,
            rows,
            state_rows(state, self._max_message_bytes),
            state_rows(owner_state, self._max_message_bytes),
        )

    async def splice(
        self,
        user_id: str,
        session_id: str,
        op: str,
        *,
        position: int = 0,
        messages: Sequence[Mapping[str, Any]] = (),
        idempotency_key: str | None = None,
    ) -> tuple[int, list[Message]] | None:
        """Change a session's messages by position, in one script; authorised by user id.

        For list-shaped chat stores. ``op``: ``"set"`` replaces every message by
        ``messages``; ``"insert"`` inserts them before ``position`` (clamped as
        ``list.insert`` does); both create the session if it is not live.
        ``"remove"`` removes the message at ``position`` (negative counts from
        the end), ``"pop"`` the last one, ``"take"`` deletes the session.
        Returns ``(message count after, removed messages)``, or ``None`` when
        there was nothing to remove (no live session, or no message there).
        A call repeated with the same ``idempotency_key`` is applied once; the
        repeat returns ``(-1, [])`` (its result is no longer known).
        """
        user_id = validate_user_id(user_id)
        session_id = validate_session_id(session_id)
        if op not in SPLICE_OPS:
            raise ValueError(f"op must be one of {sorted(SPLICE_OPS)}, got {op!r:.40}")
        if isinstance(position, bool) or not isinstance(position, int):
            raise ValueError(f"position must be an int, got {position!r:.40}")
        rows = [message_row(m, self._max_message_bytes) for m in messages]
        write_id = self._write_id(idempotency_key)
        try:
            result = await self._backend.splice(
                user_id, session_id, op, position, write_id, secrets.token_urlsafe(18), rows
            )
        except _BACKEND_ERRORS as exc:
            raise PersistError(
                f"user {user_id}: changing session {session_id} ({op}) was not confirmed: "
                + describe_error(exc)
            ) from exc
        if result is None:
            return None
        if not isinstance(result, Spliced):
            return -1, []
        return result.count, self._decode(user_id, session_id, result.removed)

    async def append_system_message(
        self, user_id: str, session_id: str, text: str, *, idempotency_key: str | None = None
    ) -> SessionInfo:
        """Append ``{"role": "system", "content": text}`` to the user's session.

        Authorised by the user id alone (no handle needed). ``idempotency_key``:
        as for ``append_message``.
        """
        user_id = validate_user_id(user_id)
        session_id = validate_session_id(session_id)
        if not isinstance(text, str):
            raise InvalidMessage(f"must be a str, not {type(text).__name__}", field="content")
        rows = self._rows({"role": "system", "content": text})
        return await self._append(user_id, session_id, None, idempotency_key, rows)

    # ------------------------------------------------------------- internals

    def _rows(self, message: object) -> list[bytes]:
        if isinstance(message, Mapping):
            return [message_row(message, self._max_message_bytes)]
        if isinstance(message, (list, tuple)):
            # The whole batch goes to the script: cutting it here first would hide
            # from the trim which tool results lost their assistant call.
            return [message_row(m, self._max_message_bytes) for m in message]
        raise InvalidMessage(
            f"must be a message dict or a list of them, not {type(message).__name__}"
        )

    async def _append(
        self,
        user_id: str,
        session_id: str,
        token: str | None,
        idempotency_key: str | None,
        rows: list[bytes],
        state: dict[str, bytes] | None = None,
        owner_state: dict[str, bytes] | None = None,
    ) -> SessionInfo:
        write_id = self._write_id(idempotency_key)
        try:
            result = await self._backend.append(
                user_id, session_id, token, write_id, rows, state, owner_state
            )
        except _BACKEND_ERRORS as exc:
            raise PersistError(
                f"user {user_id}: appending {len(rows)} message(s) to session {session_id} "
                f"was not confirmed: {describe_error(exc)}"
            ) from exc
        if isinstance(result, Forged):
            logger.warning(
                "user %s: refused a write to session %s through a Session handle the store "
                "did not issue for it (forged, or kept across a delete and re-create)",
                user_id,
                session_id,
            )
            raise SessionNotFound(user_id, session_id)
        if result is None:
            raise SessionNotFound(user_id, session_id)
        if result.dropped:
            logger.debug(
                "user %s: session %s trimmed %d message(s) to its cap of %d",
                user_id,
                session_id,
                result.dropped,
                self.max_messages,
            )
        return SessionInfo(
            user_id,
            session_id,
            result.created_ms / 1000,
            result.updated_ms / 1000,
            result.deadline_ms / 1000,
            result.count,
        )

    @staticmethod
    def _write_id(idempotency_key: str | None) -> str:
        if idempotency_key is None:
            return secrets.token_urlsafe(12)
        if (
            isinstance(idempotency_key, str)
            and 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            return _CALLER_KEY + idempotency_key  # never equal to a generated id
        raise InvalidMessage(
            f"must be a non-empty str of at most {MAX_IDEMPOTENCY_KEY_CHARS} characters",
            field="idempotency_key",
        )

    def _decode(self, user_id: str, session_id: str, rows: list[bytes]) -> list[Message]:
        try:
            messages: list[Message] = orjson.loads(b"[" + b",".join(rows) + b"]")
        except orjson.JSONDecodeError:
            messages = []
            for row in rows:
                try:
                    messages.append(orjson.loads(row))
                except orjson.JSONDecodeError:
                    messages.append({})  # rejected below with the other bad shapes
        good = [m for m in messages if _well_formed(m)]
        if len(good) != len(messages):
            logger.warning(
                "user %s: session %s has %d corrupt row(s); skipped",
                user_id,
                session_id,
                len(messages) - len(good),
            )
        return good


def _decode_state(rows: Mapping[str, bytes], *where: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    bad = 0
    for key, row in rows.items():
        try:
            state[key] = orjson.loads(row)
        except orjson.JSONDecodeError:
            bad += 1
    if bad:
        logger.warning("%s: %d corrupt state value(s) skipped", "/".join(where), bad)
    return state


def _well_formed(message: object) -> bool:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        return False
    content = message.get("content")
    if content is None:
        return content_may_be_null(message["role"], message.get("tool_calls"))
    return isinstance(content, (str, list))


def _import_keys(keys: object) -> list[str]:
    """An export's ``idempotency_keys`` as the append ids to remember, checked whole."""
    if not isinstance(keys, list):
        raise InvalidExport("idempotency_keys must be a list")
    if len(keys) > IDEM_CAP:
        raise InvalidExport(f"{len(keys)} idempotency_keys; a session remembers at most {IDEM_CAP}")
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidExport(
                f"an idempotency key is a str of 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                where=f"idempotency_keys[{index}]",
            )
    return [_CALLER_KEY + key for key in keys]
