"""Which failures are worth retrying, and how long to wait between attempts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from .._errors import ReplicationTimeout

# RedisClusterException: redis-py's client-side cluster errors ("slot not
# covered" while its slot map is rebuilt after a failover) are not RedisErrors.
TRANSIENT_ERRORS = (RedisError, OSError, TimeoutError, RedisClusterException, ReplicationTimeout)

# Server replies that say "not now" rather than "never".
_RETRYABLE_REPLIES = (
    "OOM", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS",
)  # fmt: skip

# redis-py maps these codes to classes and strips the code from the message.
_RETRYABLE_ERRORS = (
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    NoScriptError,
    AskError,  # and MovedError: resharding or a failover moved the slot
)


def is_permanent(exc: BaseException) -> bool:
    """A script error that retrying cannot fix (as opposed to a network or capacity fault)."""
    if not isinstance(exc, ResponseError) or isinstance(exc, _RETRYABLE_ERRORS):
        return False
    return not str(exc).startswith(_RETRYABLE_REPLIES)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential delays between retries: ``first`` doubling up to ``longest``."""

    first: float
    longest: float

    def delay(self, attempt: int, jitter: float | None = None) -> float:
        """The pause after the ``attempt``-th failure in a row (1-based).

        ``jitter`` in [0, 1) scales it to between half and all of the nominal
        delay, so workers failing together do not retry in lockstep.
        """
        # The exponent is capped: after ~1000 failures in a row (a long outage with
        # a tiny backoff) 2.0 ** n would overflow and kill the persist task.
        nominal: float = min(self.longest, self.first * 2.0 ** min(attempt - 1, 64))
        return nominal * (0.5 + (random.random() if jitter is None else jitter) / 2)
