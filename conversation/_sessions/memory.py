"""Sessions kept in this process's memory: the same operations as the scripts, no Redis."""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._entries import rows_to_drop
from .._redis.sessions import (
    FORGED,
    IDEM_CAP,
    REPLAYED,
    Appended,
    Created,
    Forged,
    Listed,
    Loaded,
    Spliced,
    StateRows,
)

# ---------------------------------------------------------- memory backend


@dataclass(slots=True)
class _MemSession:
    token: str
    seq: int
    created_ms: int
    updated_ms: int
    deadline: float  # time.monotonic()
    deadline_ms: int  # the same moment on the wall clock, for callers
    rows: list[bytes]
    write_ids: dict[str, None] = field(default_factory=dict)  # insertion-ordered
    state: dict[str, bytes] = field(default_factory=dict)


def _is_tool_row(row: bytes) -> bool:
    return row.startswith(b'{"role":"tool"')


def _trim(rows: list[bytes], cap: int) -> int:
    """The scripts' trim: oldest first down to cap, then no leading orphan tool result."""
    drop = rows_to_drop(len(rows), cap, lambda i: _is_tool_row(rows[i]))
    del rows[:drop]
    return drop


class MemorySessions:
    """The same operations on this process's memory (single process, no Redis)."""

    SWEEP_EVERY = 1024

    def __init__(self, *, ttl_ms: int, cap: int) -> None:
        self._ttl_ms = ttl_ms
        self._cap = cap
        self._users: dict[str, dict[str, _MemSession]] = {}
        # Scope state (a user's, a group's) with the monotonic deadline it expires at.
        self._owner_states: dict[str, tuple[float, dict[str, bytes]]] = {}
        self._groups: dict[str, tuple[float, dict[str, bytes], dict[str, float]]] = {}
        self._seq = 0
        self._ops = 0

    def _sessions(self, user_id: str) -> dict[str, _MemSession]:
        """The user's live sessions (expired ones dropped on the way); {} for none."""
        self._ops += 1
        now = time.monotonic()
        if self._ops % self.SWEEP_EVERY == 0:
            for uid in list(self._users):
                self._prune(uid, now)
        return self._prune(user_id, now) or {}

    def _prune(self, user_id: str, now: float) -> dict[str, _MemSession] | None:
        sessions = self._users.get(user_id)
        if sessions is None:
            return None
        for sid in [sid for sid, s in sessions.items() if s.deadline <= now]:
            del sessions[sid]
        if not sessions:
            del self._users[user_id]
            return None
        return sessions

    def _touch(self, session: _MemSession) -> None:
        session.deadline = time.monotonic() + self._ttl_ms / 1000
        session.deadline_ms = _now_ms() + self._ttl_ms

    def _owner(self, user_id: str, *, touch: bool) -> dict[str, bytes]:
        now = time.monotonic()
        deadline, state = self._owner_states.get(user_id, (0.0, {}))
        if deadline <= now:
            state = {}
        if touch or state:
            self._owner_states[user_id] = (
                now + self._ttl_ms / 1000 if touch else deadline,
                state,
            )
        return state

    async def create(
        self,
        user_id: str,
        session_id: str,
        token: str,
        state: StateRows | None = None,
        owner_state: StateRows | None = None,
    ) -> Created | None:
        if session_id in self._sessions(user_id):
            return None
        self._seq += 1
        now = _now_ms()
        session = _MemSession(token, self._seq, now, now, 0.0, 0, [], state=dict(state or {}))
        self._touch(session)
        self._owner(user_id, touch=True).update(owner_state or {})
        self._users.setdefault(user_id, {})[session_id] = session
        return Created(session.seq, now, session.deadline_ms)

    async def get(
        self,
        user_id: str,
        session_id: str,
        *,
        last: int | None = None,
        touch: bool = True,
        write_ids: bool = False,
    ) -> Loaded | None:
        session = self._sessions(user_id).get(session_id)
        if session is None:
            return None
        if touch:
            self._touch(session)
        rows = session.rows if last is None else session.rows[-last:] if last > 0 else []
        return Loaded(
            session.token,
            session.seq,
            session.created_ms,
            session.updated_ms,
            session.deadline_ms,
            list(rows),
            dict(session.state),
            dict(self._owner(user_id, touch=touch)),
            list(session.write_ids) if write_ids else [],
        )

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
        sessions = self._sessions(user_id)
        session = sessions.get(session_id)
        if session is None:
            if op not in ("set", "insert"):
                return None
            await self.create(user_id, session_id, token)
            session = self._users[user_id][session_id]
        elif write_id in session.write_ids:
            self._touch(session)
            return REPLAYED
        removed: list[bytes] = []
        if op == "take":
            removed = list(session.rows)
            del self._users[user_id][session_id]
            return Spliced(0, removed)
        if op == "set":
            session.rows[:] = rows
        elif op == "insert":
            at = position if position >= 0 else max(position + len(session.rows), 0)
            session.rows[at:at] = rows
        else:
            at = len(session.rows) - 1 if op == "pop" else position
            if not -len(session.rows) <= at < len(session.rows):
                self._touch(session)
                return None
            removed = [session.rows.pop(at)]
        _trim(session.rows, self._cap)
        session.write_ids[write_id] = None
        if len(session.write_ids) > IDEM_CAP:
            del session.write_ids[next(iter(session.write_ids))]
        session.updated_ms = _now_ms()
        self._touch(session)
        return Spliced(len(session.rows), removed)

    async def owner_state(self, user_id: str) -> dict[str, bytes]:
        return dict(self._owner(user_id, touch=False))

    async def group(
        self, group: str, member: str, delta: StateRows | None, *, members: bool
    ) -> tuple[dict[str, bytes], list[str]]:
        now = time.monotonic()
        deadline = now + self._ttl_ms / 1000
        old_deadline, state, live = self._groups.get(group, (0.0, {}, {}))
        if old_deadline <= now:
            state, live = {}, {}
        live = {m: d for m, d in live.items() if d > now}
        if member:
            live[member] = deadline
        state.update(delta or {})
        self._groups[group] = (deadline, state, live)
        return dict(state), sorted(live, key=live.__getitem__) if members else []

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
        session = self._sessions(user_id).get(session_id)
        if session is None:
            return None
        if token is not None and not secrets.compare_digest(token, session.token):
            return FORGED
        dropped = 0
        owner = self._owner(user_id, touch=True)
        if write_id not in session.write_ids:
            session.state.update(state or {})
            owner.update(owner_state or {})
            session.rows.extend(rows)
            dropped = _trim(session.rows, self._cap)
            session.updated_ms = _now_ms()
            session.write_ids[write_id] = None
            if len(session.write_ids) > IDEM_CAP:
                del session.write_ids[next(iter(session.write_ids))]
        self._touch(session)
        return Appended(
            len(session.rows), session.created_ms, session.updated_ms, session.deadline_ms, dropped
        )

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
        sessions = self._sessions(user_id)
        live = sessions.get(session_id)
        if live is not None and not replace:
            return len(live.rows)
        self._seq += 1
        session = _MemSession(
            token, self._seq, created_ms, _now_ms(), 0.0, 0, list(rows), state=dict(state or {})
        )
        _trim(session.rows, self._cap)
        session.write_ids = dict.fromkeys(list(write_ids)[-IDEM_CAP:])
        self._touch(session)
        self._users.setdefault(user_id, {})[session_id] = session
        return Appended(len(session.rows), created_ms, session.updated_ms, session.deadline_ms, 0)

    async def delete(self, user_id: str, session_id: str) -> bool:
        return self._sessions(user_id).pop(session_id, None) is not None

    async def list(self, user_id: str) -> list[Listed]:
        return [
            Listed(sid, s.seq, s.created_ms, s.updated_ms, s.deadline_ms, len(s.rows))
            for sid, s in self._sessions(user_id).items()
        ]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
