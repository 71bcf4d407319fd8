"""Private Redis Cluster and Sentinel deployments for tests, and a failover workload.

Every process is started from the ``redis-server`` binary on free loopback ports
(never the machine's 6379), lives in its own directory under the test's tmp
path, and is stopped by pid. Nothing waits on a fixed sleep: start-up waits for
``cluster_state:ok`` on every node and for each replica's link to its primary;
failovers wait for role changes.

Failure detection is fast (``cluster-node-timeout`` 500 ms, Sentinel's
``down-after-milliseconds`` 2 s), so a killed primary is replaced in about two
seconds on the cluster and three to four behind Sentinel.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis_servers import RedisServer, wait_until

from conversation import ConversationManager
from conversation._redis.keys import KeySpace

REDIS_CLI = shutil.which("redis-cli")
NODE_TIMEOUT_MS = 500
# Sentinel needs more slack than the cluster: below 2 s, a Sentinel that has just
# switched to the new primary sometimes believes it down at once and fails over
# again, back to the old one (seen here at 500 ms and 1 s; redis/redis#8607).
SENTINEL_DOWN_AFTER_MS = 2000
SERVICE = "mymaster"
KEYS = KeySpace("sg")

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Fast, disk-free replication: no RDB file, no delay before a full sync.
_REPLICATION = (
    "--repl-diskless-sync", "yes",
    "--repl-diskless-sync-delay", "0",
    "--repl-ping-replica-period", "1",
)  # fmt: skip


def quick_retry() -> Retry:
    """A short client-side retry for the engine's clients: the engine retries a failed
    write itself, with backoff; redis-py's default (10 tries, up to 1 s apart) can hold
    one attempt for seconds against a dead primary."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), 2)


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (each socket is held until all are chosen)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def info(port: int, section: str) -> dict[str, Any]:
    """One INFO section as redis-py parses it; empty if the server does not answer."""
    try:
        with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
            return dict(client.info(section))
    except (redis.ConnectionError, redis.TimeoutError):
        return {}


def role(port: int) -> str:
    return str(info(port, "replication").get("role", ""))


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """A flat [name, value, ...] reply (what redis-py leaves unparsed) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def wait_for_value(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``probe`` until it returns something other than None, and return that."""
    found: list[T] = []

    def check() -> bool:
        value = probe()
        if value is not None:
            found.append(value)
        return bool(found)

    wait_until(check, timeout=timeout, what=what)
    return found[0]


def spawn(servers: list[RedisServer], config_files: dict[int, Path] | None = None) -> None:
    """Launch several servers at once, then wait until each answers PING.

    ``config_files`` maps a port to the config file that server starts from
    (Sentinel needs one it can rewrite); the others start from arguments alone.
    """
    for server in servers:
        server.config_file = (config_files or {}).get(server.port)
        server.launch()
    for server in servers:
        server.wait_ready()


@contextmanager
def link_down(primary: RedisServer, replica: RedisServer) -> Iterator[None]:
    """A replica that lags: its replication link is down and cannot come back.

    The replica gets a wrong ``masterauth`` (the primary has no password, so its
    handshake fails on AUTH) and the primary drops the link (CLIENT KILL TYPE
    replica). Writes made inside the block reach the primary only, while the
    replica stays up and answering, as in a partition between the two. On exit
    the replica's ``masterauth`` is cleared again.
    """
    with redis.Redis(port=replica.port, socket_timeout=2) as follower:
        follower.config_set("masterauth", "not-the-password")
        try:
            with redis.Redis(port=primary.port, socket_timeout=2) as leader:
                leader.execute_command("CLIENT", "KILL", "TYPE", "replica")
            wait_until(
                lambda: info(replica.port, "replication").get("master_link_status") == "down",
                what="the replica's link to its primary down",
            )
            yield
        finally:
            follower.config_set("masterauth", "")


# ------------------------------------------------------------------ cluster


@dataclass
class ClusterMember:
    """One cluster node: its server process and its cluster bus port."""

    server: RedisServer
    bus_port: int

    @property
    def port(self) -> int:
        return self.server.port

    def alive(self) -> bool:
        return self.server.process is not None

    def cluster_info(self) -> dict[str, str]:
        try:
            with redis.Redis(port=self.port, socket_timeout=1, decode_responses=True) as client:
                raw = client.execute_command("CLUSTER INFO")  # parsed into a dict
        except (redis.ConnectionError, redis.TimeoutError):
            return {}
        return {str(name): str(value) for name, value in dict(raw).items()}


@dataclass
class LocalCluster:
    """3 primaries + 3 replicas on loopback, joined by ``redis-cli --cluster create``."""

    directory: Path
    primaries: int = 3
    replicas_per_primary: int = 1
    members: list[ClusterMember] = field(default_factory=list)

    def start(self) -> LocalCluster:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli is not on PATH")
        count = self.primaries * (1 + self.replicas_per_primary)
        ports = free_ports(2 * count)
        for port, bus_port in zip(ports[::2], ports[1::2], strict=True):
            extra = (
                "--cluster-enabled", "yes",
                "--cluster-port", str(bus_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # Promote a replica however long its link was down: the tests
                # kill primaries on purpose, some while the replica lags.
                "--cluster-replica-validity-factor", "0",
                *_REPLICATION,
            )  # fmt: skip
            server = RedisServer(self.directory / f"node-{port}", port=port, extra=extra)
            self.members.append(ClusterMember(server, bus_port))
        try:
            spawn([member.server for member in self.members])
            create = [
                REDIS_CLI,
                "--cluster", "create",
                *(f"127.0.0.1:{member.port}" for member in self.members),
                "--cluster-replicas", str(self.replicas_per_primary),
                "--cluster-yes",
            ]  # fmt: skip
            subprocess.run(
                create,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for member in self.members:
            member.server.kill()

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", member.port) for member in self.members]

    def member(self, port: int) -> ClusterMember:
        return next(member for member in self.members if member.port == port)

    def slot_map(self) -> dict[int, int]:
        """Slot -> port of the primary serving it, as a live node reports it."""
        for member in self.members:
            if not member.alive():
                continue
            with (
                suppress(redis.ConnectionError, redis.TimeoutError),
                redis.Redis(port=member.port, socket_timeout=1) as client,
            ):
                owners = {}
                for start, end, primary, *_replicas in client.execute_command("CLUSTER SLOTS"):
                    for slot in range(start, end + 1):
                        owners[slot] = int(primary[1])
                return owners
        raise LookupError("no live node answers CLUSTER SLOTS")

    def slot_owner(self, slot: int) -> ClusterMember:
        return self.member(self.slot_map()[slot])

    def key_owner(self, key: str) -> ClusterMember:
        return self.slot_owner(key_slot(key.encode()))

    def primary_ports(self) -> list[int]:
        return sorted(set(self.slot_map().values()))

    def replicas_of(self, primary: ClusterMember) -> list[ClusterMember]:
        fields = info(primary.port, "replication")
        ports = {
            int(value["port"])
            for name, value in fields.items()
            if name.startswith("slave") and name[5:].isdigit() and isinstance(value, dict)
        }
        return [self.member(port) for port in sorted(ports)]

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Every node up with ``cluster_state:ok``, every replica linked and synced."""

        def healthy() -> bool:
            primaries = 0
            for member in self.members:
                if member.cluster_info().get("cluster_state") != "ok":
                    return False
                fields = info(member.port, "replication")
                if fields.get("role") == "master":
                    primaries += 1
                elif fields.get("master_link_status") != "up" or fields.get(
                    "master_sync_in_progress"
                ):
                    return False
            return primaries == self.primaries

        wait_until(healthy, timeout=timeout, what="a healthy cluster (cluster_state:ok)")

    def kill(self, member: ClusterMember) -> None:
        """SIGKILL by pid: no shutdown, no last words to the replica."""
        member.server.kill()

    def wait_promoted(self, replica: ClusterMember, timeout: float = 20.0) -> None:
        """Wait until ``replica`` is a primary and reports ``cluster_state:ok``."""

        def promoted() -> bool:
            return role(replica.port) == "master" and (
                replica.cluster_info().get("cluster_state") == "ok"
            )

        wait_until(promoted, timeout=timeout, what=f"replica {replica.port} promoted")

    def restart(self, member: ClusterMember) -> None:
        """Start a killed node again: it reads nodes.conf and rejoins, as a replica."""
        spawn([member.server])


# ----------------------------------------------------------------- sentinel


@dataclass
class LocalSentinel:
    """One primary, one replica and three Sentinels (quorum 2) on loopback."""

    directory: Path
    sentinels: int = 3
    servers: list[RedisServer] = field(default_factory=list)
    sentinel_servers: list[RedisServer] = field(default_factory=list)
    _config_files: dict[int, Path] = field(default_factory=dict)

    def start(self) -> LocalSentinel:
        ports = free_ports(2 + self.sentinels)
        first, second = ports[:2]
        self.servers = [
            RedisServer(self.directory / f"redis-{first}", port=first, extra=_REPLICATION),
            RedisServer(
                self.directory / f"redis-{second}",
                port=second,
                extra=(*_REPLICATION, "--replicaof", "127.0.0.1", str(first)),
            ),
        ]
        for port in ports[2:]:
            directory = self.directory / f"sentinel-{port}"
            directory.mkdir(parents=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {first} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {SENTINEL_DOWN_AFTER_MS}\n"
                # Twice this is also the pause before a Sentinel tries the same
                # master again: the tests fail over one after the other.
                f"sentinel failover-timeout {SERVICE} 2000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n",
                encoding="utf-8",
            )
            self.sentinel_servers.append(RedisServer(directory, port=port, extra=("--sentinel",)))
            self._config_files[port] = conf
        try:
            spawn(self.servers)
            spawn(self.sentinel_servers, self._config_files)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in [*self.sentinel_servers, *self.servers]:
            server.kill()

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", server.port) for server in self.sentinel_servers]

    def server(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def _master_state(self, sentinel: RedisServer) -> dict[str, str]:
        try:
            with redis.Redis(port=sentinel.port, socket_timeout=1, decode_responses=True) as client:
                raw = client.execute_command("SENTINEL", "MASTER", SERVICE)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return {}
        fields = raw if isinstance(raw, dict) else _pairs(raw)
        return {str(name): str(value) for name, value in fields.items()}

    def _replica_flags(self, sentinel: RedisServer) -> list[str]:
        try:
            with redis.Redis(port=sentinel.port, socket_timeout=1, decode_responses=True) as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", SERVICE)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return []
        flags = []
        for replica in replicas:
            fields = replica if isinstance(replica, dict) else _pairs(replica)
            flags.append(str(fields.get("flags", "")))
        return flags

    def master_port(self) -> int | None:
        """The primary's port, if every Sentinel names the same one."""
        ports = {self._master_state(sentinel).get("port") for sentinel in self.sentinel_servers}
        port = ports.pop() if len(ports) == 1 else None
        return int(port) if port is not None else None

    def primary(self) -> RedisServer:
        port = self.master_port()
        if port is None:
            raise LookupError("the Sentinels do not agree on a primary")
        return self.server(port)

    def replica(self) -> RedisServer:
        primary = self.primary()
        return next(server for server in self.servers if server is not primary)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """The Sentinels agree on a primary that has its replica linked and synced,
        and each Sentinel knows the others."""
        others = str(self.sentinels - 1)

        def healthy() -> bool:
            for sentinel in self.sentinel_servers:
                state = self._master_state(sentinel)
                if state.get("num-other-sentinels") != others or state.get("num-slaves") != "1":
                    return False
                # No failover under way, and the replica is not down in its view
                # (else the next failover would abort for want of a good replica).
                if state.get("flags") != "master" or self._replica_flags(sentinel) != ["slave"]:
                    return False
            port = self.master_port()
            if port is None or role(port) != "master":
                return False
            replica = next(server for server in self.servers if server.port != port)
            fields = info(replica.port, "replication")
            return (
                fields.get("master_port") == port
                and fields.get("master_link_status") == "up"
                and not fields.get("master_sync_in_progress")
            )

        wait_until(healthy, timeout=timeout, what="Sentinels and a linked replica")

    def wait_failover(self, old_port: int, timeout: float = 20.0) -> RedisServer:
        """Wait until every Sentinel names a new primary that really is one."""

        def switched() -> RedisServer | None:
            port = self.master_port()
            if port is None or port == old_port or role(port) != "master":
                return None
            return self.server(port)

        return wait_for_value(switched, timeout, "Sentinel failover to the replica")

    def restart_as_replica(self, server: RedisServer, primary: RedisServer) -> None:
        """Bring a killed primary back as a replica of the new one (as an operator would)."""
        server.extra = (*_REPLICATION, "--replicaof", "127.0.0.1", str(primary.port))
        spawn([server])


# ----------------------------------------------------------------- workload


async def redis_window(client: Any, room: str) -> list[dict[str, Any]]:
    """The room's window as Redis holds it, decoded (any redis.asyncio client)."""
    rows = await client.lrange(KEYS.room(room).window, 0, -1)
    return [orjson.loads(row) for row in rows]


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a real condition from the event loop, letting other tasks run meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def assert_converged(
    managers: list[ConversationManager], client: Any, rooms: list[str]
) -> None:
    """After a sync, every manager's window equals the room's window in Redis."""
    for room in rooms:
        stored = [message["content"] for message in await redis_window(client, room)]
        for manager in managers:
            await manager.ensure_fresh_from_redis(room)
            window = [message["content"] for message in manager.get_messages(room)]
            assert window == stored, f"a manager diverged from Redis in room {room}"


class Workload:
    """Writers in several managers appending to rooms; records each acknowledged append.

    Each writer appends (``append_async``) in a loop: up to ``cap`` turns before
    the failover, then on until ``after`` appends started after the kill were
    acknowledged, so there are writes in flight when the primary dies.
    """

    def __init__(
        self,
        managers: list[ConversationManager],
        rooms: list[str],
        cap: int = 150,
        after: int = 15,
    ) -> None:
        self.managers = managers
        self.rooms = rooms
        self.cap = cap
        self.after = after
        # room -> (message id, started, acknowledged) per acknowledged append
        self.acked: dict[str, list[tuple[str, float, float]]] = {room: [] for room in rooms}
        self.killed_at = 0.0
        self._killed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for index, manager in enumerate(self.managers):
            for room in self.rooms:
                self._tasks.append(asyncio.create_task(self._writer(index, manager, room)))

    def mark_killed(self) -> None:
        self.killed_at = asyncio.get_running_loop().time()
        self._killed.set()

    async def _writer(self, index: int, manager: ConversationManager, room: str) -> None:
        loop = asyncio.get_running_loop()
        turn = after = 0
        while after < self.after:
            if turn >= self.cap and not self._killed.is_set():
                await self._killed.wait()
            message_id = f"{room}/w{index}-{turn}"
            started = loop.time()
            await manager.append_async(room, "user", f"[Message ID: {message_id}] turn {turn}")
            self.acked[room].append((message_id, started, loop.time()))
            if self._killed.is_set() and started > self.killed_at:
                after += 1
            turn += 1

    def count(self, room: str) -> int:
        return len(self.acked[room])

    async def finish(self) -> None:
        await asyncio.gather(*self._tasks)

    def recovery(self, room: str) -> tuple[float, int]:
        """Seconds from the kill until an append to ``room`` started after it was
        acknowledged, and how many appends (any room) were waiting meanwhile."""
        recovered = min(acked for _, started, acked in self.acked[room] if started > self.killed_at)
        waiting = sum(
            1
            for appends in self.acked.values()
            for _, started, acked in appends
            if acked > self.killed_at and started < recovered
        )
        return recovered - self.killed_at, waiting

    async def report(
        self,
        label: str,
        client: Any,
        busy: str,
        promoted_after: float,
        record_property: Callable[[str, object], None],
    ) -> int:
        """Check the 30 turns queued in ``busy`` landed once each, record and log the
        failover's numbers; returns how many acknowledged appends were lost."""
        stored = [m["content"] for m in await redis_window(client, busy)]
        assert sum(1 for content in stored if content.endswith("] queued")) == 30
        lost = await self.lost(client)
        recovered_after, waiting = self.recovery(busy)
        numbers = {
            "acknowledged_appends": sum(self.count(room) for room in self.rooms),
            "writes_during_failover": waiting + 30,
            "replica_promoted_after_s": round(promoted_after, 2),
            "busy_room_writable_after_s": round(recovered_after, 2),
            "acknowledged_writes_lost": lost,
            "persist_retries": sum(m.stats()["persist_retries"] for m in self.managers),
        }
        for name, value in numbers.items():
            record_property(name, value)
        logger.warning("%s: %s", label, numbers)
        return lost

    async def lost(self, client: Any) -> int:
        """Acknowledged appends that Redis does not hold."""
        lost = 0
        for room in self.rooms:
            stored = {message_id_of(message) for message in await redis_window(client, room)}
            lost += sum(1 for message_id, _, _ in self.acked[room] if message_id not in stored)
        return lost


def message_id_of(message: dict[str, Any]) -> str:
    """The id in a text message's leading ``[Message ID: ...]`` marker."""
    content = str(message["content"])
    return content[len("[Message ID: ") : content.index("]")]


class LaggingWrites:
    """20 concurrent appends made while the replica lags, and what became of them.

    The room must hold 10 turns before (``before``). ``start`` launches the
    appends, ``reach_primary`` waits until they are on the primary as far as
    they can get, ``check`` (after the failover) settles them, lets another
    worker write on the new primary, and checks convergence and losses.
    """

    count = 20

    def __init__(self, writer: ConversationManager, room: str) -> None:
        self.writer = writer
        self.room = room
        self.acked: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.on_primary_only = self.acknowledged_while_lagging = 0

    async def before(self) -> None:
        for turn in range(10):
            await self.writer.append_async(self.room, "user", f"[Message ID: before-{turn}] b")

    async def _write(self, turn: int) -> None:
        await self.writer.append_async(self.room, "user", f"[Message ID: lag-{turn}] lagging")
        self.acked.append(f"lag-{turn}")

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._write(turn)) for turn in range(self.count)]

    async def reach_primary(self, primary: redis.Redis) -> None:
        """Without WAIT all are acknowledged (so all are on the primary). With it the
        first lands and is retried, unconfirmed, while the others queue behind it in
        order: wait until WAIT has refused it twice."""
        window = KEYS.room(self.room).window
        await eventually(
            lambda: (
                all(task.done() for task in self.tasks)
                or (primary.llen(window) > 10 and self.writer.stats()["unreplicated_writes"] >= 2)
            ),
            10,
            "the lagging writes on the primary",
        )
        self.on_primary_only = int(primary.llen(window)) - 10
        self.acknowledged_while_lagging = len(self.acked)

    async def check(
        self,
        label: str,
        min_replicas: int,
        other: ConversationManager,
        client: Any,
        record_property: Callable[[str, object], None],
    ) -> None:
        await asyncio.gather(*self.tasks)
        await self.writer.drain(timeout=30)
        # Another worker writes on the new primary: versions there pass the writer's.
        for turn in range(25):
            await other.append_async(self.room, "assistant", f"[Message ID: after-{turn}] after")
        await assert_converged([self.writer, other], client, [self.room])
        stored = [m["content"] for m in await redis_window(client, self.room)]
        assert len(stored) == len(set(stored)), "a retried write landed twice"
        lost = sum(1 for mid in self.acked if f"[Message ID: {mid}] lagging" not in stored)
        outcome = (self.on_primary_only, self.acknowledged_while_lagging, lost)
        for name, value in zip(
            ("on_primary_only", "acknowledged_while_lagging", "acknowledged_writes_lost"),
            outcome,
            strict=True,
        ):
            record_property(name, value)
        logger.warning(
            "%s, min_replicas=%d: %d of %d appends reached the primary only, "
            "%d of them acknowledged, %d acknowledged appends lost",
            label, min_replicas, outcome[0], self.count, outcome[1], lost,
        )  # fmt: skip
        if min_replicas:
            assert self.on_primary_only >= 1
            assert (self.acknowledged_while_lagging, lost) == (0, 0)
        else:
            assert outcome == (self.count, self.count, self.count)
