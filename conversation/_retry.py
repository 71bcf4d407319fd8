"""Which failures are worth retrying: shared by the persist loop and consolidation."""

from __future__ import annotations

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

from ._errors import ReplicationTimeout

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
