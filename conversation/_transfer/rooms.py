"""Room export and import (SPEC §35).

An export is a plain dict that ``json.dumps`` accepts::

    {"format": "conversation-room", "format_version": 1, "room_id": ...,
     "exported_at": ISO time, "source": {"epoch", "version", "head"},
     "head": int, "limit": int (0 = the manager's default), "rebackfill": bool,
     "entries": [stored entries, each with its "message_id" identity],
     "archive": None | {"elements": [archived rows and fold commit records]},
     "idempotency_keys": [tokens of the writes the room applied, oldest first],
     "extensions": {}}

``idempotency_keys`` travel with the room so that a write retried under its key
after the room moved is a replay on the imported room, not a second copy.

``extensions`` is where state kept beside the window goes: ``"reactions"`` (the
window's tracked reactions) and ``"deferred"`` (events waiting for their message),
each present only when the room has some (``_transfer/extensions.py``). An
importer refuses an extension it does not know rather than drop it. The import is
``lua/import.lua``: one script, a new epoch, all or nothing, extensions included.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .._consolidation.archive import ArchiveMoved, read_archive
from .._engine.ops import now_ms
from .._engine.window import RoomState
from .._entries import build_entry, encode
from .._errors import InvalidExport, InvalidMessage, RoomNotEmpty
from .._redis.keys import KeySpace
from .._redis.rooms import RoomStore
from .extensions import (
    DEFERRED,
    REACTIONS,
    ParsedExtensions,
    export_deferred,
    export_reactions,
    parse_extensions,
)

FORMAT = "conversation-room"
FORMAT_VERSION = 1
#: Extensions this engine can import: tracked reactions and deferred events (SPEC §35).
#: An export without them imports as before; one carrying a name outside this set is
#: refused, so an engine never silently drops state a newer one exported.
KNOWN_EXTENSIONS: frozenset[str] = frozenset({REACTIONS, DEFERRED})
MAX_IMPORT_ENTRIES = 10_000
#: A room keeps its newest 1024 tokens (plus up to 64 before a trim); room to spare.
MAX_IMPORT_TOKENS = 2048
MAX_TOKEN_CHARS = 128
#: The highest head an import accepts: positions grow from it by one per trimmed row,
#: and a cursor refuses positions past 2**53.
MAX_HEAD = 2**50
_ROW_FIELDS = {"message_id", "role", "content", "name", "tool_calls", "tool_call_id"}
_ATTEMPTS = 5

Progress = Callable[[str], None]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def export_room(
    store: RoomStore,
    keyspace: KeySpace,
    room_id: str,
    *,
    archives: bool,
    timeout: float | None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The room as Redis holds it: the window at one version, and (if asked) the
    archive read while that version stood, so no turn is in both or in neither."""
    keys = keyspace.room(room_id)
    for _attempt in range(_ATTEMPTS):
        reply = await store.sync(keys, RoomState())
        state = RoomState(epoch=reply.epoch, version=reply.version, head=reply.head, tag=reply.tag)
        rows = list(reply.rows) if reply.kind == 2 else []
        elements: list[bytes] | None = None
        if archives:
            try:
                elements = await read_archive(store.redis, keys.archive, timeout)
            except ArchiveMoved:
                continue
            if progress is not None:
                progress(f"read {len(rows)} entries and {len(elements)} archive elements")
        tokens = await store.idempotency_tokens(keys)
        # Every change to the tracked reactions (a reaction, a patch, an append that
        # applies waiting events, a clear) advances the version, so reactions read
        # between the two syncs belong to this window. Keeping an event advances
        # nothing: one kept meanwhile is in the export or not, as if it came just
        # after or just before; one applied meanwhile moves the version.
        entries = [orjson.loads(row) for row in rows]
        identities = [e["message_id"] for e in entries if isinstance(e.get("message_id"), str)]
        async with asyncio.timeout(timeout):
            tracked = await store.redis.hmget(keys.reactions, identities) if identities else []
            waiting = await store.redis.hgetall(keys.deferred)
        state.window.push_stored(rows, room_id)  # sync answers "nothing changed" or not
        if (await store.sync(keys, state)).kind != 0:
            continue  # a write came between the two reads: read again
        extensions: dict[str, Any] = {}
        if reactions := export_reactions(identities, tracked):
            extensions[REACTIONS] = reactions
        if deferred := export_deferred(waiting, now_ms()):
            extensions[DEFERRED] = deferred
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "room_id": room_id,
            "exported_at": _now(),
            "source": {"epoch": reply.epoch, "version": reply.version, "head": reply.head},
            "head": reply.head if reply.kind == 2 else 0,
            "limit": reply.limit,
            "rebackfill": reply.rebackfill,
            "entries": entries,
            "archive": None if elements is None else {"elements": _decode_all(elements)},
            "idempotency_keys": [token.decode("utf-8", "replace") for token in tokens],
            "extensions": extensions,
        }
    raise TimeoutError(f"room {room_id!r} kept changing during {_ATTEMPTS} export reads")


def _decode_all(elements: Sequence[bytes]) -> list[Any]:
    out: list[Any] = []
    for raw in elements:
        try:
            out.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            out.append({"corrupt": raw.decode("utf-8", "replace")})
    return out


@dataclass(frozen=True, slots=True)
class ParsedRoom:
    head: int
    limit: int
    rebackfill: bool
    rows: list[bytes]
    archive: tuple[bytes, list[bytes]] | None
    extensions: ParsedExtensions
    tokens: list[str] = field(default_factory=list)


def parse_room_export(
    data: object, max_entry_bytes: int, progress: Progress | None = None
) -> ParsedRoom:
    """Check every field of an export before anything is written; InvalidExport names
    the first problem."""
    if not isinstance(data, Mapping):
        raise InvalidExport(f"an export is a JSON object, not {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise InvalidExport(f"format is {data.get('format')!r:.60}, not {FORMAT!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidExport(f"format_version {version!r:.40} is not a version number")
    if version > FORMAT_VERSION:
        raise InvalidExport(
            f"format_version {version} was written by a newer engine (this one reads "
            f"{FORMAT_VERSION})"
        )
    extensions = data.get("extensions", {})
    if not isinstance(extensions, Mapping):
        raise InvalidExport("extensions must be an object")
    unknown = sorted(set(extensions) - KNOWN_EXTENSIONS)
    if unknown:
        raise InvalidExport(
            f"carries {unknown}, which this engine cannot import (they would be lost)"
        )
    head = _count(data.get("head", 0), "head")
    if head > MAX_HEAD:
        raise InvalidExport(
            f"head {head} leaves no room to grow (cursors hold positions below 2**53)"
        )
    limit = _count(data.get("limit", 0), "limit")
    if limit and not 50 <= limit <= 1000:
        raise InvalidExport(f"limit {limit} is outside [50, 1000] (0 = default)")
    rebackfill = data.get("rebackfill", False)
    if not isinstance(rebackfill, bool):
        raise InvalidExport("rebackfill must be true or false")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise InvalidExport("entries must be a list")
    if len(entries) > MAX_IMPORT_ENTRIES:
        raise InvalidExport(f"{len(entries)} entries; at most {MAX_IMPORT_ENTRIES} import")
    rows = []
    for index, entry in enumerate(entries):
        rows.append(_row(entry, max_entry_bytes, f"entries[{index}]"))
        if progress is not None and index % 500 == 499:
            progress(f"checked {index + 1}/{len(entries)} entries")
    archive = data.get("archive")
    identities = {e["message_id"] for e in entries if isinstance(e.get("message_id"), str)}
    return ParsedRoom(
        head,
        limit,
        rebackfill,
        rows,
        None if archive is None else _archive(archive),
        parse_extensions(extensions, identities),
        _tokens(data.get("idempotency_keys", [])),
    )


def _tokens(tokens: object) -> list[str]:
    if not isinstance(tokens, list):
        raise InvalidExport("idempotency_keys must be a list")
    if len(tokens) > MAX_IMPORT_TOKENS:
        raise InvalidExport(f"{len(tokens)} idempotency_keys; at most {MAX_IMPORT_TOKENS} import")
    for index, token in enumerate(tokens):
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise InvalidExport(
                f"an idempotency key is a str of 1 to {MAX_TOKEN_CHARS} characters",
                where=f"idempotency_keys[{index}]",
            )
    return tokens


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise InvalidExport(f"{what} must be an int >= 0, not {value!r:.40}")
    return value


def _row(entry: object, max_entry_bytes: int, where: str) -> bytes:
    if not isinstance(entry, Mapping):
        raise InvalidExport("an entry must be an object", where=where)
    unknown = sorted(set(entry) - _ROW_FIELDS)
    if unknown:
        raise InvalidExport(f"unknown field(s) {unknown}", where=where)
    identity = entry.get("message_id")
    try:
        # The stored identity is kept as it was, never derived again from the text:
        # a marker someone typed must not become an identity on the way in.
        built = build_entry(
            entry.get("role"),
            entry.get("content"),
            message_id=identity if identity is not None else "x",
            name=entry.get("name"),
            tool_calls=entry.get("tool_calls"),
            tool_call_id=entry.get("tool_call_id"),
        )
        if identity is None:
            built["message_id"] = None
        return encode(built, max_entry_bytes)
    except InvalidMessage as exc:
        raise InvalidExport(str(exc), where=where) from exc


def _archive(archive: object) -> tuple[bytes, list[bytes]]:
    if not isinstance(archive, Mapping) or not isinstance(archive.get("elements"), list):
        raise InvalidExport("archive must be null or an object with an 'elements' list")
    elements: list[bytes] = []
    ledger: list[str] = []
    count = size = total = 0
    for index, element in enumerate(archive["elements"]):
        if not isinstance(element, Mapping):
            raise InvalidExport("an archive element must be an object", where=f"archive[{index}]")
        raw = orjson.dumps(element)
        elements.append(raw)
        count, size = count + 1, size + len(raw)
        if "seq" in element and "role" not in element:  # a fold's commit record ends it
            ledger.append(f"{count}:{size}")
            total += size
            count = size = 0
    if count:
        raise InvalidExport("the archive ends inside a fold (rows after the last commit record)")
    header = f"~a2|0|{len(elements)}|{total}|{len(ledger)}||0|0|{','.join(ledger)}"
    return header.encode(), elements


async def import_room(
    store: RoomStore,
    keyspace: KeySpace,
    room_id: str,
    parsed: ParsedRoom,
    *,
    replace: bool,
) -> int:
    """Write the parsed export as the room, under a new epoch; returns its version.

    An export whose limit is 0 took its source's default (``max_history``), which
    this importer does not know: rows past its own default are refused, not trimmed.
    """
    limit = parsed.limit or store.default_limit
    if len(parsed.rows) > limit:
        raise InvalidExport(
            f"holds {len(parsed.rows)} entries, more than the window limit {limit} the "
            "room would keep (the export's limit is 0: the importer's max_history)"
        )
    done, value = await store.import_room(
        keyspace.room(room_id),
        epoch=secrets.token_hex(6),
        replace=replace,
        head=parsed.head,
        limit=parsed.limit,
        rebackfill=parsed.rebackfill,
        rows=parsed.rows,
        archive=parsed.archive,
        tokens=parsed.tokens,
        reactions=parsed.extensions.reactions,
        deferred=parsed.extensions.deferred_values(now_ms()),
    )
    if not done:
        raise RoomNotEmpty(room_id, value)
    return value
