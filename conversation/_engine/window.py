"""The in-memory window of one room, and how a script reply from Redis updates it.

Rows are kept as the exact bytes Redis holds, with identity and role beside
them: persisting needs no re-serialisation, catching up needs no re-parsing of
rows we already have, and handing out messages is one ``orjson.loads``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._entries import decode_row, is_summary, rows_to_drop
from .._reactions import RoomReactions
from .._redis.replies import SyncReply

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Window:
    """Rows with their identities and roles (``role is None`` marks a corrupt row).

    Corrupt rows are kept so positions stay aligned with Redis, and skipped
    whenever messages are handed out.
    """

    rows: list[bytes] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    roles: list[str | None] = field(default_factory=list)
    corrupt: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def copy(self) -> Window:
        return Window(self.rows.copy(), self.ids.copy(), self.roles.copy(), self.corrupt)

    def push(self, row: bytes, identity: str | None, role: str | None) -> None:
        self.rows.append(row)
        self.ids.append(identity)
        self.roles.append(role)
        if role is None:
            self.corrupt += 1

    def extend(self, rows: Sequence[tuple[bytes, str | None, str]]) -> None:
        """Append rows of known identity and role (none corrupt), in one step."""
        self.rows.extend(row for row, _, _ in rows)
        self.ids.extend(identity for _, identity, _ in rows)
        self.roles.extend(role for _, _, role in rows)

    def push_stored(self, rows: list[bytes], room_id: str) -> int:
        """Append rows read from Redis, decoding each; returns how many were corrupt."""
        bad = 0
        for row in rows:
            meta = decode_row(row)
            if meta is None:
                bad += 1
                logger.warning(
                    "room %s: skipping a corrupt row from Redis (%d bytes)", room_id, len(row)
                )
                self.push(row, None, None)
            else:
                self.push(row, *meta)
        return bad

    def set(self, index: int, row: bytes, identity: str | None, role: str | None) -> None:
        if self.roles[index] is None:
            self.corrupt -= 1
        if role is None:
            self.corrupt += 1
        self.rows[index] = row
        self.ids[index] = identity
        self.roles[index] = role

    def drop_front(self, count: int) -> None:
        if count <= 0:
            return
        if self.corrupt:
            self.corrupt -= sum(1 for role in self.roles[:count] if role is None)
        del self.rows[:count], self.ids[:count], self.roles[:count]

    def clear(self) -> None:
        self.rows.clear()
        self.ids.clear()
        self.roles.clear()
        self.corrupt = 0

    def trim(self, limit: int) -> int:
        """Mirror of the Lua trim: down to ``limit``, no leading orphan tool results,
        and a consolidation summary at the head stays there."""
        size = len(self.rows)
        if size <= limit:
            return 0
        keep_summary = limit > 1 and is_summary(self.ids[0], self.roles[0])
        summary = (self.rows[0], self.ids[0], self.roles[0])
        roles = self.roles
        drop = rows_to_drop(size, limit, lambda i: roles[i] == "tool", keep_first=keep_summary)
        self.drop_front(drop)
        if keep_summary and self.rows:
            self.set(0, *summary)
        return drop

    def find_last(self, identity: str) -> int | None:
        ids = self.ids
        try:
            return len(ids) - 1 - ids[::-1].index(identity)  # a C scan, from the end
        except ValueError:
            return None

    def healthy_rows(self) -> list[bytes]:
        if not self.corrupt:
            return self.rows.copy()
        return [row for row, role in zip(self.rows, self.roles, strict=True) if role is not None]

    def last_role(self) -> str | None:
        for role in reversed(self.roles):
            if role is not None:
                return role
        return None


@dataclass(slots=True)
class RoomState:
    """A window plus the room settings that travel with it.

    As the *synced* state it mirrors Redis exactly at ``(epoch, version)``, with
    ``head`` the absolute position of its first row; as a *view* it is the synced
    state with this worker's not-yet-confirmed writes applied on top.
    """

    window: Window = field(default_factory=Window)
    epoch: str = ""
    version: int = 0
    head: int = 0
    limit: int = 0  # 0: the manager's default (max_history)
    rebackfill: bool = False
    # A memory-only room's tracked reactions (shared by copies: there is one
    # copy of the room). With Redis they live in the room's reactions hash.
    reactions: RoomReactions | None = None
    # A memory-only room's deferred events: identity -> (expiry ms, event), in
    # arrival order. With Redis they live in the room's deferred hash.
    deferred: dict[str, list[tuple[int, bytes]]] | None = None
    tag: str = ""  # the lineage tag of ``version`` (see lua/_lib.lua), sent back with it

    @property
    def size(self) -> int:
        return len(self.window)

    def copy(self) -> RoomState:
        return RoomState(
            self.window.copy(),
            self.epoch,
            self.version,
            self.head,
            self.limit,
            self.rebackfill,
            self.reactions,
            self.deferred,
            self.tag,
        )


def apply_reply(
    state: RoomState,
    reply: SyncReply,
    room_id: str,
    own_rows: Sequence[tuple[bytes, str | None, str]] = (),
) -> int:
    """Bring a synced state to the reply's version; returns corrupt rows seen."""
    state.tag = reply.tag
    if reply.kind == 0:
        state.version = reply.version
        return 0
    window = state.window
    bad = 0
    if reply.kind == 2:
        window.clear()
        bad = window.push_stored(reply.rows, room_id)
        state.epoch = reply.epoch
    else:
        window.drop_front(min(reply.head - state.head, len(window)))
        for position, row in reply.replaced:
            meta = decode_row(row)
            if meta is None:
                bad += 1
                logger.warning(
                    "room %s: skipping a corrupt row from Redis (%d bytes)", room_id, len(row)
                )
                window.set(position - reply.head, row, None, None)
            else:
                window.set(position - reply.head, row, *meta)
        bad += window.push_stored(reply.rows, room_id)
        if reply.own_kept:
            for row, identity, role in own_rows[len(own_rows) - reply.own_kept :]:
                window.push(row, identity, role)
    state.version = reply.version
    state.head = reply.head
    state.limit = reply.limit
    state.rebackfill = reply.rebackfill
    return bad
