"""A private ``redis-server`` process on a free loopback port, stopped by its pid.

The demo's embedded backend, the benchmark and the test fixtures all start their
own servers; this is the one place that knows how to launch one, wait until it
answers, and stop it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

_PORT_ATTEMPTS = 5


class ServerExited(RuntimeError):
    """The server process ended before it answered PING (see its ``redis.log``)."""


def free_port() -> int:
    """A loopback port nobody listens on right now (another process may take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "redis-server is not on PATH (install Debian's redis-server, or pass --redis-url)"
        )
    return binary


@dataclass
class RedisServerProcess:
    """One ``redis-server``: no persistence unless ``extra`` asks for it.

    ``port=0`` picks a free port, and a new one if another process takes it
    between the probe and the bind. ``config_file`` is passed first (Sentinel
    needs a file it can rewrite); ``new_session`` keeps a terminal's Ctrl-C from
    reaching the server before its clients are done with it.
    """

    directory: Path
    port: int = 0
    extra: tuple[str, ...] = ()
    config_file: Path | None = None
    new_session: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _auto_port: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port()
            self._auto_port = True

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_file(self) -> Path:
        return self.directory / "redis.log"

    def launch(self) -> None:
        """Start the process without waiting for it (see ``wait_ready``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            *([str(self.config_file)] if self.config_file is not None else []),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.log_file),
            *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.new_session,
        )

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ping():
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout}s")
            time.sleep(0.01)

    def start(self, timeout: float = 10.0) -> RedisServerProcess:
        for _attempt in range(_PORT_ATTEMPTS if self._auto_port else 1):
            self.launch()
            try:
                self.wait_ready(timeout)
            except ServerExited:
                if not self._auto_port:
                    raise
                self.port = free_port()  # most likely taken between probe and bind
                continue
            self._auto_port = False  # a restart must come back on the same port
            return self
        raise ServerExited(f"redis-server would not start (see {self.log_file})")

    def ping(self) -> bool:
        """Whether it answers; raises ``ServerExited`` if the process is gone."""
        if self.process is not None and self.process.poll() is not None:
            raise ServerExited(
                f"redis-server on port {self.port} exited with {self.process.returncode} "
                f"(see {self.log_file})"
            )
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5) as client:
                return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    def wait_replica_synced(self, timeout: float = 30.0) -> None:
        """Wait until this server, started as a replica, is linked and has synced."""

        def synced() -> bool:
            with redis.Redis(port=self.port, socket_timeout=1, decode_responses=True) as client:
                fields = client.info("replication")
            return fields.get("master_link_status") == "up" and not fields.get(
                "master_sync_in_progress"
            )

        deadline = time.monotonic() + timeout
        while not synced():
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica on port {self.port} did not sync in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s), and wait for the process to end."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing saved, nothing said to replicas."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()
