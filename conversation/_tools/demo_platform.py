"""The demo's ``--platform-payloads`` mode: Discord gateway payloads through the binding.

The event source turns the scripted conversation into the dicts Discord's
gateway sends (``MESSAGE_CREATE``, ``MESSAGE_UPDATE``, ``MESSAGE_DELETE``,
``MESSAGE_REACTION_ADD``/``REMOVE``), redelivers a fifth of the reaction events
(as a gateway does after a resume) and sends one edit before its message. Each
worker parses them with discord.py's own gateway parsers, as on a live
connection, and ``conversation.platforms.discord.Binding`` makes the engine
calls. The parent then checks the outcome against a model computed from the
payloads alone: the reactions per user, and the early edit.

Imported only in that mode: it needs discord.py (``conversation[discord]``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import discord

from .._manager import ConversationManager
from ..platforms.discord import Binding
from .demo_events import Event

logger = logging.getLogger(__name__)

GUILD_ID = "7000"
BOT_USER_ID = 999
#: The script's users as Discord accounts: their display names are what a guild
#: shows, two of them hostile to a prompt (brackets, a non-ASCII name).
USERS: dict[str, tuple[int, str]] = {
    "ana": (101, "Ana"),
    "bo": (102, "Bo"),
    "chen": (103, "Chen"),
    "dara": (104, "dara [mod]"),
    "eli": (105, "Eli"),
    "farah": (106, "Fárah ✨"),
}
BOT_USER: dict[str, Any] = {
    "id": str(BOT_USER_ID), "username": "sage", "global_name": "Sage", "discriminator": "0",
    "avatar": None, "bot": True,
}  # fmt: skip
#: Marks the edit the source sends before its message (the engine defers it).
EARLY_EDIT_SUFFIX = "(edited before it arrived)"
REDELIVERY_SHARE = 0.2
# A bot reply's Discord id: the platform gives it one; the demo derives it.
_BOT_REPLY_OFFSET = 9_000_000_000
_REACTIONS = re.compile(r"\[Reactions: ([^\]]*)\]")


def channel_of(room: str) -> str:
    """``discord:<channel id>`` → the channel id."""
    return room.split(":", 1)[1]


def bot_reply_id(message_id: str) -> str:
    return str(int(message_id) + _BOT_REPLY_OFFSET)


def _user(author: str) -> dict[str, Any]:
    user_id, display = USERS.get(author, (100, author))
    return {"id": str(user_id), "username": author, "global_name": display,
            "discriminator": "0", "avatar": None}  # fmt: skip


def message_payload(
    room: str,
    message_id: str,
    text: str,
    at: str,
    *,
    author: dict[str, Any],
    images: Sequence[str] = (),
    edited_at: str | None = None,
) -> dict[str, Any]:
    """A ``MESSAGE_CREATE`` (or, with ``edited_at``, ``MESSAGE_UPDATE``) payload."""
    mentions = [BOT_USER] if "@Sage" in text else []
    return {
        "id": message_id, "channel_id": channel_of(room), "guild_id": GUILD_ID,
        "author": author, "content": text.replace("@Sage", f"<@{BOT_USER_ID}>"),
        "timestamp": at, "edited_timestamp": edited_at, "tts": False,
        "mention_everyone": False, "mentions": mentions, "mention_roles": [],
        "attachments": [
            {"id": f"{message_id}{index}", "filename": url.rsplit("/", 1)[-1], "size": 48_213,
             "url": url, "proxy_url": url, "content_type": "image/jpeg"}
            for index, url in enumerate(images)
        ],
        "embeds": [], "pinned": False, "type": 0,
    }  # fmt: skip


def bot_message(room: str, message_id: str, text: str, at: str) -> dict[str, Any]:
    """The gateway's echo of a message the bot sent."""
    return {
        "t": "MESSAGE_CREATE",
        "d": message_payload(room, message_id, text, at, author=BOT_USER),
    }


def _reaction(room: str, message_id: str, user: str, emoji: str) -> dict[str, Any]:
    return {"user_id": str(USERS[user][0]), "channel_id": channel_of(room),
            "message_id": message_id, "guild_id": GUILD_ID,
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0}  # fmt: skip


# ====================================================================== payloads


def to_payloads(script: Sequence[Event], seed: int) -> list[Event]:
    """The script as gateway payloads: each event's ``data`` gains ``gateway``
    (``{"t": ..., "d": ...}``); commands stay as they are (slash commands are
    interactions, not gateway message events).

    Reactions become per-user: an add by a user who has not reacted with that
    emoji, a remove by one who has. A fifth of them are sent twice, the copy up
    to three events later but never after another event of the same user and
    emoji on that message (a redelivery does not overtake what followed it).
    One plain message near the end of the first room gets its edit sent first.
    """
    rng = random.Random(f"platform-{seed}")
    created: dict[str, dict[str, Any]] = {}
    holders: dict[tuple[str, str], list[str]] = {}  # (message, emoji) -> users, in order
    early = _early_edit_target(script)
    out: list[tuple[str, str, dict[str, Any]]] = []  # (kind, room, data)
    pending: list[tuple[int, tuple[str, str, str], tuple[str, str, dict[str, Any]]]] = []

    def release(key: tuple[str, str, str] | None) -> None:
        for item in list(pending):
            due, held_key, copy = item
            if due <= len(out) or held_key == key:
                pending.remove(item)
                out.append(copy)

    for event in script:
        room, data = event.room, dict(event.data)
        kind = event.kind
        if kind == "message":
            d = message_payload(
                room, data["message_id"], data["text"], data["at"],
                author=_user(data["author"]), images=data.get("images") or (),
            )  # fmt: skip
            created[data["message_id"]] = d
            if data["message_id"] == early:
                edited = {**d, "content": f"{d['content']} {EARLY_EDIT_SUFFIX}",
                          "edited_timestamp": data["at"]}  # fmt: skip
                early_data = {"message_id": early, "author": data["author"], "at": data["at"],
                              "text": f"{data['text']} {EARLY_EDIT_SUFFIX}", "early": True,
                              "gateway": {"t": "MESSAGE_UPDATE", "d": edited}}  # fmt: skip
                release(None)
                out.append(("edit", room, early_data))
            data["gateway"] = {"t": "MESSAGE_CREATE", "d": d}
        elif kind == "edit":
            original = created[data["message_id"]]
            d = {**original, "content": data["text"], "edited_timestamp": data["at"]}
            data["gateway"] = {"t": "MESSAGE_UPDATE", "d": d}
        elif kind == "delete":
            d = {"id": data["message_id"], "channel_id": channel_of(room), "guild_id": GUILD_ID}
            data["gateway"] = {"t": "MESSAGE_DELETE", "d": d}
        elif kind == "reaction":
            emoji, message_id = data["emoji"], data["message_id"]
            users = holders.setdefault((message_id, emoji), [])
            others = [u for u in USERS if u not in users]
            if users and (data["op"] == "remove" or not others):
                user, op = rng.choice(users), "remove"
                users.remove(user)
            else:
                user, op = rng.choice(others), "add"
                users.append(user)
            data.update(user=user, op=op)
            data.pop("summary", None)  # the platform sends no summary: that is the point
            t = "MESSAGE_REACTION_ADD" if op == "add" else "MESSAGE_REACTION_REMOVE"
            data["gateway"] = {"t": t, "d": _reaction(room, message_id, user, emoji)}
            key = (message_id, user, emoji)
            release(key)
            out.append((kind, room, data))
            if rng.random() < REDELIVERY_SHARE:
                copy = {**data, "redelivered": True}
                pending.append((len(out) + rng.randint(0, 2), key, (kind, room, copy)))
            continue
        release(None)
        out.append((kind, room, data))
    release(None)
    out.extend(copy for _, _, copy in pending)
    return [Event(seq, kind, room, data) for seq, (kind, room, data) in enumerate(out)]


def _early_edit_target(script: Sequence[Event]) -> str | None:
    """The last plain message of the first room that no later event touches."""
    if not script:
        return None
    first = script[0].room
    touched = {e.data["message_id"] for e in script if e.kind in {"edit", "delete", "reaction"}}
    for event in reversed(script):
        data = event.data
        if (
            event.room == first
            and event.kind == "message"
            and not data.get("images")
            and not data.get("tool")
            and not data.get("mentions_bot")
            and data["message_id"] not in touched
        ):
            return str(data["message_id"])
    return None


def payload_summary(events: Sequence[Event]) -> str:
    kinds: dict[str, int] = {}
    for event in events:
        gateway = event.data.get("gateway")
        if gateway:
            kinds[gateway["t"]] = kinds.get(gateway["t"], 0) + 1
    redelivered = sum(1 for e in events if e.data.get("redelivered"))
    early = sum(1 for e in events if e.data.get("early"))
    listed = ", ".join(f"{n} {t}" for t, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return f"{listed}; {redelivered} redelivered, {early} edit sent before its message"


# ======================================================================= model


def reaction_model(events: Sequence[Event]) -> dict[str, str]:
    """Per message, the ``[Reactions: …]`` summary the events call for: who holds
    which emoji (a redelivered add or remove changes nothing), listed by count,
    ties in the order the emoji were first seen (an emoji nobody holds any more
    is forgotten)."""
    held: dict[str, dict[str, list[str]]] = {}
    for event in events:
        if event.kind != "reaction":
            continue
        data = event.data
        emoji = held.setdefault(data["message_id"], {})
        users = emoji.setdefault(data["emoji"], [])
        if data["op"] == "add" and data["user"] not in users:
            users.append(data["user"])
        elif data["op"] == "remove" and data["user"] in users:
            users.remove(data["user"])
        if not users:
            del emoji[data["emoji"]]
    summaries = {}
    for message_id, emoji in held.items():
        order = sorted(enumerate(emoji.items()), key=lambda item: (-len(item[1][1]), item[0]))
        summaries[message_id] = ", ".join(f"{e} {len(users)}" for _, (e, users) in order)
    return summaries


def _text(entry: Mapping[str, Any]) -> str:
    content = entry.get("content")
    if isinstance(content, list):
        return next((str(p.get("text", "")) for p in content if p.get("type") == "text"), "")
    return str(content or "")


@dataclass(slots=True)
class Outcome:
    """What the parent checked in Redis, as lines to print, and whether all held."""

    ok: bool = True
    lines: list[tuple[bool, str]] = field(default_factory=list)

    def check(self, passed: bool, line: str) -> None:
        self.ok &= passed
        self.lines.append((passed, line))


def check_outcome(
    events: Sequence[Event], rows: Mapping[str, Sequence[Mapping[str, Any]]], deferred: int
) -> Outcome:
    """The bindings' work in Redis (``rows``: each room's stored entries, with
    their ``message_id``) against what the payloads call for; ``deferred``: the
    inference worker's ``stats()["deferred_events"]``."""
    outcome = Outcome()
    by_id = {str(entry.get("message_id")): entry for entries in rows.values() for entry in entries}
    rooms = ", ".join(rows)
    outcome.check(
        all(re.fullmatch(r"discord:[0-9]+", room) for room in rows) and bool(by_id),
        f"rooms: {rooms} (discord:<channel id>)",
    )
    named = {e.get("name") for e in by_id.values() if e.get("role") == "user"}
    outcome.check(
        bool(named) and all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(name)) for name in named),
        "names: "
        + ", ".join(sorted(str(n) for n in named))
        + ' (OpenAI-safe; "dara [mod]" is shown as "dara (mod)")',
    )
    markers = [
        e for e in by_id.values()
        if e.get("role") == "user" and _text(e).startswith(f"[Message ID: {e.get('message_id')}]")
    ]  # fmt: skip
    outcome.check(
        len(markers) == sum(1 for e in by_id.values() if e.get("role") == "user"),
        f"markers: {len(markers)} user turns start with [Message ID: <discord id>]",
    )
    model = reaction_model(events)
    counts: dict[str, int] = {}
    for event in events:
        if event.kind == "reaction":
            counts[event.data["message_id"]] = counts.get(event.data["message_id"], 0) + 1
    redelivered = sum(1 for e in events if e.kind == "reaction" and e.data.get("redelivered"))
    checked = wrong = 0
    for message_id, summary in model.items():
        entry = by_id.get(message_id)
        if entry is None:
            continue  # cleared, trimmed or folded away since
        checked += 1
        found = _REACTIONS.search(_text(entry))
        if (found.group(1) if found else "") != summary:
            wrong += 1
            outcome.check(False, f"reactions on {message_id}: Redis {found and found.group(0)!r}, "
                          f"the model {summary!r}")  # fmt: skip
    outcome.check(
        wrong == 0 and checked > 0,
        f"reactions: {sum(counts.values())} add/remove events ({redelivered} redelivered) on "
        f"{len(counts)} messages; the {checked} still stored carry exactly the model's tags",
    )
    if counts:
        storm = max(counts, key=lambda m: counts[m])
        entry = by_id.get(storm)
        tag = _REACTIONS.search(_text(entry)) if entry else None
        outcome.check(
            tag is not None and tag.group(1) == model.get(storm),
            f"storm: {counts[storm]} events on {storm} → "
            f"{tag.group(0) if tag else 'no tag'} = the model's [Reactions: {model.get(storm)}]",
        )
    early = next((e for e in events if e.data.get("early")), None)
    if early is not None:
        entry = by_id.get(early.data["message_id"])
        outcome.check(
            deferred >= 1 and entry is not None and _text(entry).endswith(EARLY_EDIT_SUFFIX),
            f"edit before its message: MESSAGE_UPDATE for {early.data['message_id']} came "
            f"first (deferred; the inference worker deferred {deferred} "
            f"event{'s' if deferred != 1 else ''}), applied "
            "when its MESSAGE_CREATE landed: "
            + (repr(_text(entry)) if entry else "message missing"),
        )
    return outcome


# ===================================================================== workers


class GatewayFeed:
    """One worker's discord.py client: parses gateway payloads with discord.py's own
    parsers and runs the binding's handlers to the end."""

    def __init__(self, manager: ConversationManager) -> None:
        # discord.py warns at start-up that voice needs PyNaCl: the demo has no voice.
        logging.getLogger("discord.client").setLevel(logging.ERROR)
        self.client = discord.Client(intents=discord.Intents.default())
        self.binding = Binding(manager, bot_user_id=BOT_USER_ID)
        self.binding.attach(self.client)
        self.failures = 0
        self.client.on_error = self._on_error  # type: ignore[method-assign]

    async def start(self) -> None:
        # What login does first: gives the client its loop (no network).
        await self.client._async_setup_hook()

    async def deliver(self, gateway: Mapping[str, Any]) -> None:
        before = self.failures
        self.client._connection.parsers[gateway["t"]](dict(gateway["d"]))
        handlers = [t for t in asyncio.all_tasks() if t.get_name().startswith("discord.py:")]
        await asyncio.gather(*handlers)
        if self.failures != before:
            raise RuntimeError(f"the binding failed on {gateway['t']}")

    async def _on_error(self, event: str, *args: Any, **kwargs: Any) -> None:
        self.failures += 1
        logger.exception("discord.py handler %s failed", event)

    async def close(self) -> None:
        await self.client.close()
