"""Counters exposed by ``ConversationManager.stats()``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Stats:
    appends: int = 0
    edits: int = 0
    reactions: int = 0
    deferred_events: int = 0
    deferred_applied: int = 0
    deferred_refused: int = 0
    deferred_failures: int = 0
    persists: int = 0
    persist_failures: int = 0
    persist_retries: int = 0
    writes_refused: int = 0
    durable_failures: int = 0
    unreplicated_writes: int = 0
    reloads: int = 0
    catch_ups: int = 0
    conflicts: int = 0
    folds: int = 0
    change_reads: int = 0
    corrupt_rows: int = 0
    decode_slices: int = 0
    round_trips: int = 0
    script_reloads: int = 0
    stale_reads: int = 0
    # freshness="push": warm reads served without a round trip, and reads that
    # made the sync because a doubt stood (cold room, reconnect, notice ahead, ...).
    push_reads: int = 0
    push_fallbacks: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
