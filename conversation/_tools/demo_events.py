"""The demo's events as they travel through its Redis Stream (both of its modes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Event:
    """One platform event, as it travels through the stream."""

    seq: int
    kind: str  # message | edit | delete | reaction | command
    room: str
    data: dict[str, Any]

    def to_fields(self) -> dict[str, bytes]:
        return {
            "seq": str(self.seq).encode(),
            "kind": self.kind.encode(),
            "room": self.room.encode(),
            "data": orjson.dumps(self.data),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Event:
        return cls(
            int(fields[b"seq"]),
            fields[b"kind"].decode(),
            fields[b"room"].decode(),
            orjson.loads(fields[b"data"]),
        )
