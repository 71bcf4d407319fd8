"""The manager's settings the engine core needs, each checked once, here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import ConfigurationError, require_positive_int
from .._redis.retry import Backoff

FRESHNESS = ("sync", "push")


@dataclass(frozen=True, slots=True)
class Settings:
    max_history: int
    max_pending: int
    durable_timeout: float
    command_timeout: float | None
    sync_timeout: float
    backoff: Backoff
    #: "sync" (a warm read makes its one-round-trip sync) or "push" (SPEC §37).
    freshness: str = "sync"


def checked_settings(
    *,
    redis: Any,
    max_history: int,
    ttl_seconds: float | None,
    max_pending_writes: int,
    durable_timeout: float,
    command_timeout: float | None,
    sync_timeout: float,
    retry_backoff: tuple[float, float],
    min_replicas: int,
    replica_timeout_ms: int,
    freshness: str = "sync",
) -> Settings:
    """Refuse any setting that cannot work, with an error naming it."""
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
        raise ConfigurationError(f"max_history must be a positive int, got {max_history!r}")
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise ConfigurationError(f"ttl_seconds must be positive or None, got {ttl_seconds!r}")
    _check_replication(redis, min_replicas, replica_timeout_ms, command_timeout)
    require_positive_int("max_pending_writes", max_pending_writes)
    _reject_decoding_client(redis)
    if freshness not in FRESHNESS:
        raise ConfigurationError(
            f"freshness must be one of {', '.join(map(repr, FRESHNESS))}, got {freshness!r}"
        )
    return Settings(
        max_history=max_history,
        max_pending=max_pending_writes,
        durable_timeout=durable_timeout,
        command_timeout=command_timeout,
        sync_timeout=sync_timeout,
        backoff=Backoff(*retry_backoff),
        freshness=freshness,
    )


def _check_replication(
    redis: Any, min_replicas: int, replica_timeout_ms: int, command_timeout: float | None
) -> None:
    if isinstance(min_replicas, bool) or not isinstance(min_replicas, int) or min_replicas < 0:
        raise ConfigurationError(f"min_replicas must be an int >= 0, got {min_replicas!r}")
    # WAIT 0 would block until the replicas answer, however long that takes.
    require_positive_int("replica_timeout_ms", replica_timeout_ms)
    if not min_replicas:
        return
    if redis is None:
        raise ConfigurationError("min_replicas needs a redis client: memory has no replicas")
    if command_timeout is not None and command_timeout * 1000 <= replica_timeout_ms:
        raise ConfigurationError(
            f"command_timeout ({command_timeout}s) must exceed replica_timeout_ms "
            f"({replica_timeout_ms} ms): every write waits up to that long for its WAIT"
        )


def _reject_decoding_client(redis: Any) -> None:
    if redis is None:
        return
    get_encoder = getattr(redis, "get_encoder", None)
    if get_encoder is None:
        return
    try:
        decoding = bool(get_encoder().decode_responses)
    except Exception:  # an unusual client shape: let the first command tell
        return
    if decoding:
        raise ConfigurationError(
            "the redis client must be created with decode_responses=False: "
            "the engine stores and compares raw bytes"
        )
