"""The Redis side of sessions (SPEC §4.19): keys, backend records, and one typed
method per ``lua/session_*.lua`` script. ``conversation._sessions`` is the store.

    {prefix}:session:{<user_id>}:index            ZSET session id -> expiry deadline (ms)
    {prefix}:session:{<user_id>}:seq              STRING creation counter
    {prefix}:session:{<user_id>}:meta:<session>   HASH user, sid, token, seq, created, ...
    {prefix}:session:{<user_id>}:msgs:<session>   LIST orjson rows, oldest first
    {prefix}:session:{<user_id>}:idem:<session>   ZSET ids of the last 64 appends applied
    {prefix}:session:{<user_id>}:state:<session>  HASH the session's state (key -> orjson)
    {prefix}:session:{<user_id>}:ustate           HASH the user's state, shared by their sessions
    {prefix}:session:{<group>}:gstate             HASH a group's state (an app's, for ADK)
    {prefix}:session:{<group>}:members            ZSET the group's users -> deadline (ms)

Every key of a user is built from the user id and shares its hash tag, so one
user's index and sessions live in one cluster slot and each script touches one
slot. A group's two keys carry the group's own tag (``session_group.lua``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .._errors import ConfigurationError
from .._stats import Stats
from .keys import KeySpace
from .pipeliner import Pipeliner, forget_pooled_connections
from .scripts import Arg, load_session_scripts

#: Sessions described per ``session_list`` call (each one is a key of that call).
LIST_CHUNK: Final = 256
#: Append ids remembered per session (the scripts' IDEM_CAP).
IDEM_CAP: Final = 64

# --------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The keys one session script takes as KEYS, in order."""

    index: str
    seq: str
    meta: str
    messages: str
    idem: str
    state: str
    owner_state: str

    def as_list(self) -> list[str]:
        return [
            self.index,
            self.seq,
            self.meta,
            self.messages,
            self.idem,
            self.state,
            self.owner_state,
        ]


class SessionKeySpace:
    """Key names of the sessions service: every key carries the user's hash tag.

    The session id is always the last component after a fixed ``:meta:``,
    ``:msgs:`` or ``:idem:``, and the user id sits inside braces it cannot contain, so no two
    (user, session) pairs can map to the same key.
    """

    def __init__(self, prefix: str = "sg", family: str = "session") -> None:
        self.prefix = KeySpace(prefix).prefix  # same prefix rules as the engine
        self.family = family

    def user_base(self, user_id: str) -> str:
        return f"{self.prefix}:{self.family}:{{{user_id}}}"

    def owner_state(self, user_id: str) -> str:
        return self.user_base(user_id) + ":ustate"

    def group_state(self, group: str) -> str:
        return self.user_base(group) + ":gstate"

    def group_members(self, group: str) -> str:
        return self.user_base(group) + ":members"

    def index(self, user_id: str) -> str:
        return self.user_base(user_id) + ":index"

    def seq(self, user_id: str) -> str:
        return self.user_base(user_id) + ":seq"

    def meta(self, user_id: str, session_id: str) -> str:
        return f"{self.user_base(user_id)}:meta:{session_id}"

    def messages(self, user_id: str, session_id: str) -> str:
        return f"{self.user_base(user_id)}:msgs:{session_id}"

    def idem(self, user_id: str, session_id: str) -> str:
        return f"{self.user_base(user_id)}:idem:{session_id}"

    def session(self, user_id: str, session_id: str) -> SessionKeys:
        return SessionKeys(
            self.index(user_id),
            self.seq(user_id),
            self.meta(user_id, session_id),
            self.messages(user_id, session_id),
            self.idem(user_id, session_id),
            f"{self.user_base(user_id)}:state:{session_id}",
            self.owner_state(user_id),
        )


# ----------------------------------------------------------- backend records


@dataclass(frozen=True, slots=True)
class Created:
    seq: int
    created_ms: int
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class Loaded:
    token: str
    seq: int
    created_ms: int
    updated_ms: int
    deadline_ms: int
    rows: list[bytes]
    state: dict[str, bytes]
    owner_state: dict[str, bytes]
    # The append ids the session remembers, oldest first (only when asked for).
    write_ids: list[str] = field(default_factory=list)


#: A state delta as the scripts take it: key -> orjson value.
StateRows = dict[str, bytes]


@dataclass(frozen=True, slots=True)
class Appended:
    count: int
    created_ms: int
    updated_ms: int
    deadline_ms: int
    dropped: int


@dataclass(frozen=True, slots=True)
class Listed:
    session_id: str
    seq: int
    created_ms: int
    updated_ms: int
    deadline_ms: int
    count: int


@dataclass(frozen=True, slots=True)
class Spliced:
    """What ``session_splice`` did: the row count after it and the rows it removed."""

    count: int
    removed: list[bytes]


#: ``session_splice``'s reply to a write id it had already applied.
REPLAYED: Final = "replayed"

#: The positional operations of ``session_splice.lua``.
SPLICE_OPS: Final = frozenset({"set", "insert", "remove", "pop", "take"})


class Forged:
    """The append script found the session but not the handle's token."""


FORGED: Final = Forged()


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _rows(values: Sequence[object]) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]


def _pairs(delta: StateRows | None) -> list[Arg]:
    """A delta as the scripts read it: a count, then (key, value) pairs."""
    if not delta:
        return [0]
    flat: list[Arg] = [len(delta)]
    for key, value in delta.items():
        flat.extend((key, value))
    return flat


def _read_hash(reply: Sequence[Any], at: int) -> tuple[dict[str, bytes], int]:
    """A count-prefixed hash from a script reply at ``at``; the position after it."""
    n = int(reply[at])
    values = _rows(reply[at + 1 : at + 1 + 2 * n])
    fields = [_text(v) for v in values[0::2]]
    return dict(zip(fields, values[1::2], strict=True)), at + 1 + 2 * n


# ----------------------------------------------------------- Redis backend


class RedisSessions:
    """One typed method per ``lua/session_*.lua`` script; calls of a tick share a pipeline."""

    def __init__(
        self,
        redis: Any,
        keys: SessionKeySpace,
        *,
        ttl_ms: int,
        cap: int,
        command_timeout: float | None,
    ) -> None:
        self.redis = redis
        self.scripts = load_session_scripts()
        self.stats = Stats()
        self._keys = keys
        self._ttl_ms = ttl_ms
        self._cap = cap
        self._timeout = command_timeout
        # One pipeline per loop tick (side by side on a Cluster), and the one
        # NOSCRIPT reload path: the room engine's own.
        self._pipeliner = Pipeliner(redis, self.scripts, self.stats, command_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _call(self, name: str, keys: list[str], args: list[Arg]) -> Any:
        self._follow_loop()
        return await self._pipeliner.call(self.scripts[name], keys, args)

    def _follow_loop(self) -> None:
        """Move to the caller's loop once the previous one closed (SPEC §26).

        The rule of the room engine's ``LoopBinding``: a store nobody uses from a
        closed loop any more takes the next one (``asyncio.run`` per request),
        with a fresh pipeliner and the client's connections of the closed loop
        forgotten; while its loop is open, another loop is refused.
        """
        running = asyncio.get_running_loop()
        loop = self._loop
        if running is loop:
            return
        if loop is not None and not loop.is_closed():
            raise ConfigurationError(
                "this SessionStore belongs to another event loop, which is still open: "
                "use it from that loop, or give each loop its own store"
            )
        self._loop = running
        if loop is not None:
            self._pipeliner = Pipeliner(self.redis, self.scripts, self.stats, self._timeout)
            forget_pooled_connections(self.redis)

    def _common(self, user_id: str) -> list[Arg]:
        return [user_id, self._ttl_ms]

    async def create(
        self,
        user_id: str,
        session_id: str,
        token: str,
        state: StateRows | None = None,
        owner_state: StateRows | None = None,
    ) -> Created | None:
        keys = self._keys.session(user_id, session_id)
        args: list[Arg] = [*self._common(user_id), session_id, token]
        args += _pairs(state) + _pairs(owner_state)
        reply = await self._call("session_create", keys.as_list(), args)
        if int(reply[0]) != 1:
            return None
        return Created(int(reply[1]), int(reply[2]), int(reply[3]))

    async def get(
        self,
        user_id: str,
        session_id: str,
        *,
        last: int | None = None,
        touch: bool = True,
        write_ids: bool = False,
    ) -> Loaded | None:
        keys = self._keys.session(user_id, session_id)
        args: list[Arg] = [
            *self._common(user_id),
            session_id,
            -1 if last is None else last,
            "1" if touch else "0",
            "1" if write_ids else "0",
        ]
        reply = await self._call("session_get", keys.as_list(), args)
        if int(reply[0]) != 1:
            return None
        state, at = _read_hash(reply, 6)
        owner_state, at = _read_hash(reply, at)
        ids: list[str] = []
        if write_ids:
            count = int(reply[at])
            ids = [_text(v) for v in reply[at + 1 : at + 1 + count]]
            at += 1 + count
        return Loaded(
            _text(reply[1]),
            int(reply[2]),
            int(reply[3]),
            int(reply[4]),
            int(reply[5]),
            _rows(reply[at:]),
            state,
            owner_state,
            ids,
        )

    async def append(
        self,
        user_id: str,
        session_id: str,
        token: str | None,
        write_id: str,
        rows: Sequence[bytes],
        state: StateRows | None = None,
        owner_state: StateRows | None = None,
    ) -> Appended | Forged | None:
        keys = self._keys.session(user_id, session_id)
        args: list[Arg] = [
            *self._common(user_id),
            session_id,
            "0" if token is None else "1",
            token or "",
            self._cap,
            write_id,
            *_pairs(state),
            *_pairs(owner_state),
            *rows,
        ]
        reply = await self._call("session_append", keys.as_list(), args)
        status = int(reply[0])
        if status == 2:
            return FORGED
        if status != 1:
            return None
        return Appended(*(int(v) for v in reply[1:6]))

    async def import_(
        self,
        user_id: str,
        session_id: str,
        token: str,
        rows: Sequence[bytes],
        *,
        created_ms: int,
        replace: bool,
        state: StateRows | None = None,
        write_ids: Sequence[str] = (),
    ) -> Appended | int:
        """``lua/session_import.lua``: the imported session, or how many messages the
        live session it refused to replace holds."""
        keys = self._keys.session(user_id, session_id)
        args: list[Arg] = [
            *self._common(user_id),
            session_id,
            token,
            "1" if replace else "0",
            created_ms,
            self._cap,
            *_pairs(state),
            len(write_ids),
            *write_ids,
            *rows,
        ]
        reply = await self._call("session_import", keys.as_list(), args)
        if int(reply[0]) != 1:
            return int(reply[1])
        return Appended(int(reply[5]), int(reply[2]), int(reply[3]), int(reply[4]), 0)

    async def delete(self, user_id: str, session_id: str) -> bool:
        keys = self._keys.session(user_id, session_id)
        reply = await self._call(
            "session_delete", keys.as_list(), [*self._common(user_id), session_id]
        )
        return int(reply) == 1

    async def splice(
        self,
        user_id: str,
        session_id: str,
        op: str,
        position: int,
        write_id: str,
        token: str,
        rows: Sequence[bytes],
    ) -> Spliced | str | None:
        keys = self._keys.session(user_id, session_id)
        args: list[Arg] = [
            *self._common(user_id),
            session_id,
            op,
            position,
            self._cap,
            write_id,
            token,
            *rows,
        ]
        reply = await self._call("session_splice", keys.as_list(), args)
        status = int(reply[0])
        if status == 3:
            return REPLAYED
        if status != 1:
            return None
        return Spliced(int(reply[1]), _rows(reply[2:]))

    async def owner_state(self, user_id: str) -> dict[str, bytes]:
        self._follow_loop()
        async with asyncio.timeout(self._timeout):
            flat = await self.redis.hgetall(self._keys.owner_state(user_id))
        return {_text(k): v for k, v in flat.items()}

    async def group(
        self, group: str, member: str, delta: StateRows | None, *, members: bool
    ) -> tuple[dict[str, bytes], list[str]]:
        keys = [self._keys.group_state(group), self._keys.group_members(group)]
        args: list[Arg] = [self._ttl_ms, member, "1" if members else "0", *_pairs(delta)]
        reply = await self._call("session_group", keys, args)
        state, at = _read_hash(reply, 0)
        return state, [_text(m) for m in reply[at:]]

    async def list(self, user_id: str) -> list[Listed]:
        index = self._keys.index(user_id)
        async with asyncio.timeout(self._timeout):
            members = await self.redis.zrange(index, 0, -1)
        session_ids = [_text(m) for m in members]
        listed: list[Listed] = []
        for start in range(0, len(session_ids), LIST_CHUNK):
            chunk = session_ids[start : start + LIST_CHUNK]
            keys = [index, self._keys.seq(user_id)]
            keys.extend(self._keys.meta(user_id, sid) for sid in chunk)
            reply = await self._call("session_list", keys, [*self._common(user_id), *chunk])
            for at in range(0, len(reply), 6):
                sid, seq, created, updated, deadline, count = reply[at : at + 6]
                listed.append(
                    Listed(
                        _text(sid), int(seq), int(created), int(updated), int(deadline), int(count)
                    )
                )
        return listed
