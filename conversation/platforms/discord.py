"""discord.py events as engine calls (``pip install 'conversation[discord]'``).

::

    binding = Binding(manager)
    binding.attach(client)      # a discord.Client (or commands.Bot)

Each channel is a room, ``discord:<channel id>``; a thread or a forum post has
its own channel id, so it is its own room. Messages (``on_message``) are
appended as ``[Message ID: <id>] <author>: <text>`` with the author's name made
safe for OpenAI's ``name`` and each image attachment as an ``image_url`` part
(other files as a text line); the bot's own messages are ``assistant`` turns.
Mentions are rendered readable (``@name``, ``#channel``, ``:emoji:``). Edits,
deletes (one or in bulk) and reactions (add, remove, clear, clear one emoji)
come as raw events, so they work for messages discord.py never cached; those
that arrive before their message wait for it (SPEC §31).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import discord

from .._manager import ConversationManager
from ._mapping import Attachment, BindingBase, Turn, label, now_iso, room_id, safe_name

__all__ = ["Binding"]

logger = logging.getLogger(__name__)

_USER_MENTION = re.compile(r"<@!?([0-9]{1,25})>")
_ROLE_MENTION = re.compile(r"<@&([0-9]{1,25})>")
_CHANNEL_MENTION = re.compile(r"<#([0-9]{1,25})>")
_CUSTOM_EMOJI = re.compile(r"<a?:([A-Za-z0-9_]{1,64}):[0-9]{1,25}>")

#: The raw gateway events a binding listens to (``on_<name>`` on the client).
EVENTS = (
    "message",
    "raw_message_edit",
    "raw_message_delete",
    "raw_bulk_message_delete",
    "raw_reaction_add",
    "raw_reaction_remove",
    "raw_reaction_clear",
    "raw_reaction_clear_emoji",
)


def _message(state: Any, data: dict[str, Any]) -> discord.Message:
    channel, _ = state._get_guild_channel(data)
    return discord.Message(channel=channel, data=data, state=state)  # type: ignore[arg-type]


def _payload_emoji(state: Any, data: dict[str, Any]) -> discord.PartialEmoji:
    emoji = discord.PartialEmoji.from_dict(data["emoji"])
    emoji._state = state
    return emoji


# Gateway dispatches and how discord.py's ConnectionState parsers build each one's
# object (without dispatching it: handle() calls the binding's own handler).
_PAYLOADS: dict[str, Callable[[Any, dict[str, Any]], object]] = {
    "MESSAGE_CREATE": _message,
    "MESSAGE_UPDATE": lambda state, data: discord.RawMessageUpdateEvent(
        data=data,  # type: ignore[arg-type]
        message=_message(state, data),
    ),
    "MESSAGE_DELETE": lambda _, data: discord.RawMessageDeleteEvent(data),  # type: ignore[arg-type]
    "MESSAGE_DELETE_BULK": lambda _, data: discord.RawBulkMessageDeleteEvent(data),  # type: ignore[arg-type]
    "MESSAGE_REACTION_ADD": lambda state, data: discord.RawReactionActionEvent(
        data,  # type: ignore[arg-type]
        _payload_emoji(state, data),
        "REACTION_ADD",
    ),
    "MESSAGE_REACTION_REMOVE": lambda state, data: discord.RawReactionActionEvent(
        data,  # type: ignore[arg-type]
        _payload_emoji(state, data),
        "REACTION_REMOVE",
    ),
    "MESSAGE_REACTION_REMOVE_ALL": lambda _, data: discord.RawReactionClearEvent(data),  # type: ignore[arg-type]
    "MESSAGE_REACTION_REMOVE_EMOJI": lambda state, data: discord.RawReactionClearEmojiEvent(
        data,  # type: ignore[arg-type]
        _payload_emoji(state, data),
    ),
}


class Binding(BindingBase):
    """Maps a discord.py client's events onto ``manager``.

    ``bot_user_id``: the bot's own user id (its messages become ``assistant``
    turns); by default the attached client's ``user``.
    """

    _logger = logger
    _refused = "discord event"

    def __init__(
        self,
        manager: ConversationManager,
        *,
        bot_user_id: int | str | None = None,
        room_prefix: str = "discord",
    ) -> None:
        super().__init__(manager, room_prefix=room_prefix)
        self.bot_user_id = None if bot_user_id is None else int(bot_user_id)
        self._client: discord.Client | None = None

    def room(self, channel_id: int) -> str:
        return room_id(self.room_prefix, channel_id)

    # ------------------------------------------------------------- wiring

    def attach(self, client: discord.Client) -> None:
        """Listen to ``client``'s events; handlers it already has keep running first."""
        self._client = client
        for name in EVENTS:
            handler = getattr(self, f"on_{name}")
            add_listener = getattr(client, "add_listener", None)
            if add_listener is not None:  # commands.Bot
                add_listener(handler, f"on_{name}")
                continue
            setattr(client, f"on_{name}", _chained(getattr(client, f"on_{name}", None), handler))

    async def handle(self, event: object) -> bool | None:
        """One event: a ``discord.Message`` or a ``Raw…Event``, or a raw gateway
        dispatch payload (``{"t": "MESSAGE_CREATE", "d": {...}}``, which discord.py
        builds with the attached client's state); what the engine call returned
        (None: nothing to record)."""
        if isinstance(event, Mapping):
            built = self._from_payload(event)
            if built is None:
                return None
            event = built
        if isinstance(event, discord.Message):
            return await self.on_message(event)
        if isinstance(event, discord.RawMessageUpdateEvent):
            return await self.on_raw_message_edit(event)
        if isinstance(event, discord.RawMessageDeleteEvent):
            return await self.on_raw_message_delete(event)
        if isinstance(event, discord.RawBulkMessageDeleteEvent):
            return await self.on_raw_bulk_message_delete(event)
        if isinstance(event, discord.RawReactionClearEmojiEvent):
            return await self.on_raw_reaction_clear_emoji(event)
        if isinstance(event, discord.RawReactionClearEvent):
            return await self.on_raw_reaction_clear(event)
        if isinstance(event, discord.RawReactionActionEvent):
            if event.event_type == "REACTION_ADD":
                return await self.on_raw_reaction_add(event)
            return await self.on_raw_reaction_remove(event)
        raise TypeError(f"not a discord.py event this binding maps: {type(event).__name__}")

    def _from_payload(self, payload: Mapping[str, Any]) -> object | None:
        """The discord.py object a gateway dispatch payload becomes, as the library's
        own parsers build it; None for a dispatch this binding does not map."""
        kind, data = payload.get("t"), payload.get("d")
        if not isinstance(kind, str) or not isinstance(data, Mapping):
            raise TypeError('a gateway payload is {"t": <event name>, "d": {...}}')
        build = _PAYLOADS.get(kind)
        if build is None:
            return None
        if self._client is None:
            raise TypeError("a raw gateway payload needs an attached discord.Client to build it")
        try:
            return build(self._client._connection, dict(data))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a {kind} payload discord.py cannot read: {exc!r:.200}") from exc

    # ------------------------------------------------------------- events

    async def on_message(self, message: discord.Message) -> bool | None:
        turn = self.turn(message)
        room = self.room(message.channel.id)
        # A redelivered MESSAGE_CREATE lands once, whichever worker gets it.
        return await self._append_turn(room, turn, f"{self.room_prefix}:{message.id}")

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> bool | None:
        data: dict[str, Any] = dict(payload.data)
        if "content" not in data:
            return None  # an embed unfurled: the text did not change
        turn = self.turn(payload.message)
        room = self.room(payload.channel_id)
        return await self._update_turn(room, turn)

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> bool | None:
        room = self.room(payload.channel_id)
        return await self._guard(
            room, self.manager.mark_deleted_async(room, payload.message_id, now_iso())
        )

    async def on_raw_bulk_message_delete(
        self, payload: discord.RawBulkMessageDeleteEvent
    ) -> bool | None:
        room = self.room(payload.channel_id)
        when = now_iso()
        found = False
        for message_id in sorted(payload.message_ids):
            found |= bool(
                await self._guard(room, self.manager.mark_deleted_async(room, message_id, when))
            )
        return found

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> bool | None:
        room = self.room(payload.channel_id)
        return await self._guard(
            room,
            self.manager.add_reaction_async(
                room, payload.message_id, _emoji(payload.emoji), payload.user_id
            ),
        )

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> bool | None:
        room = self.room(payload.channel_id)
        return await self._guard(
            room,
            self.manager.remove_reaction_async(
                room, payload.message_id, _emoji(payload.emoji), payload.user_id
            ),
        )

    async def on_raw_reaction_clear(self, payload: discord.RawReactionClearEvent) -> bool | None:
        room = self.room(payload.channel_id)
        return await self._guard(room, self.manager.clear_reactions_async(room, payload.message_id))

    async def on_raw_reaction_clear_emoji(
        self, payload: discord.RawReactionClearEmojiEvent
    ) -> bool | None:
        room = self.room(payload.channel_id)
        return await self._guard(
            room,
            self.manager.clear_reactions_async(room, payload.message_id, _emoji(payload.emoji)),
        )

    # ------------------------------------------------------------- mapping

    def turn(self, message: discord.Message) -> Turn:
        """A message as the engine records it."""
        author = message.author
        own = self._bot_id() == author.id
        display = getattr(author, "display_name", None) or author.name
        return Turn(
            message_id=str(message.id),
            text=self.readable(message),
            role="assistant" if own else "user",
            name=None if own else safe_name(display, author.id),
            author=None if own else label(display),
            attachments=[
                Attachment(a.filename, a.url, a.content_type, a.size) for a in message.attachments
            ],
        )

    def readable(self, message: discord.Message) -> str:
        """The text with mentions as people read them: ``@name``, ``@role``, ``#channel``,
        ``:emoji:`` (an unknown user, role or channel shows its id)."""
        users = {m.id: m for m in message.mentions}
        roles = {r.id: r for r in message.role_mentions}

        def user(match: re.Match[str]) -> str:
            found = users.get(int(match.group(1)))
            return f"@{label(found.display_name)}" if found else f"@user-{match.group(1)}"

        def role(match: re.Match[str]) -> str:
            found = roles.get(int(match.group(1)))
            return f"@{label(found.name)}" if found else f"@role-{match.group(1)}"

        def channel(match: re.Match[str]) -> str:
            found = self._client.get_channel(int(match.group(1))) if self._client else None
            name = getattr(found, "name", None)
            return f"#{label(name)}" if name else f"#channel-{match.group(1)}"

        text = _USER_MENTION.sub(user, message.content or "")
        text = _ROLE_MENTION.sub(role, text)
        text = _CHANNEL_MENTION.sub(channel, text)
        return _CUSTOM_EMOJI.sub(r":\1:", text)

    def _bot_id(self) -> int | None:
        if self.bot_user_id is not None:
            return self.bot_user_id
        user = self._client.user if self._client is not None else None
        return user.id if user is not None else None


def _emoji(emoji: discord.PartialEmoji) -> str:
    """A reaction's emoji as the engine keys it: the character, or ``<:name:id>``."""
    if emoji.id is None:
        return emoji.name or ""
    prefix = "a" if emoji.animated else ""
    return f"<{prefix}:{emoji.name or 'emoji'}:{emoji.id}>"


def _chained(
    first: Callable[..., Awaitable[Any]] | None, then: Callable[..., Awaitable[Any]]
) -> Callable[..., Awaitable[None]]:
    async def handler(*args: Any) -> None:
        if first is not None:
            await first(*args)
        await then(*args)

    return handler
