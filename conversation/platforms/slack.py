"""slack-bolt (async) events as engine calls (``pip install 'conversation[slack]'``).

::

    binding = Binding(manager, user_names=names)   # names: user id -> display name
    binding.attach(app)                            # a slack_bolt.async_app.AsyncApp

Each channel is a room, ``slack:<channel id>``; with ``threads_as_rooms=True``
a thread is its own room, ``slack:<channel id>:<thread ts>``. A message's id is
its ``ts``: ``[Message ID: 1712345678.000100] <author>: <text>``. Slack names
users by id only, so display names come from ``user_names`` (an async callable;
by default the attached app's ``users.info``, cached; the id when it fails).
Files are ``url_private`` links: images become ``image_url`` parts (the model
needs the bot token to fetch them, so most bots download and inline them
first), other files a text line. ``message_changed`` and ``message_deleted``
edit and delete, ``reaction_added`` / ``reaction_removed`` count reactions
(``:thumbsup:``); events before their message wait for it (SPEC §31).

Bolt drops the bot's own messages unless the app is built with
``ignoring_self_events_enabled=False``; they are then recorded as ``assistant``.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from slack_bolt.async_app import AsyncApp

from .._manager import ConversationManager
from ._mapping import Attachment, BindingBase, Turn, label, now_iso, remember, room_id, safe_name

__all__ = ["Binding"]

logger = logging.getLogger(__name__)

UserNames = Callable[[str], Awaitable[str | None]]

_USER_MENTION = re.compile(r"<@([A-Z0-9]{1,32})(?:\|[^>]*)?>")
_CHANNEL_MENTION = re.compile(r"<#([A-Z0-9]{1,32})(?:\|([^>]*))?>")
_SPECIAL = re.compile(r"<!(here|channel|everyone)(?:\|[^>]*)?>")
_SUBTEAM = re.compile(r"<!subteam\^[A-Z0-9]+(?:\|([^>]*))?>")
_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|([^>]*))?>")
#: Message subtypes that are not a turn (joins, topic changes, …) are skipped.
_TURN_SUBTYPES = frozenset({None, "bot_message", "file_share", "thread_broadcast", "me_message"})
# Threads a reaction may belong to: reaction events name only channel and ts.
_THREAD_MEMORY = 10_000


class Binding(BindingBase):
    """Maps a slack-bolt ``AsyncApp``'s events onto ``manager``.

    ``bot_user_id``: the bot's user id (its messages become ``assistant``
    turns); by default the one Bolt's authorization found for the request.
    """

    _logger = logger
    _refused = "slack event"

    def __init__(
        self,
        manager: ConversationManager,
        *,
        bot_user_id: str | None = None,
        room_prefix: str = "slack",
        threads_as_rooms: bool = False,
        user_names: UserNames | None = None,
    ) -> None:
        super().__init__(manager, room_prefix=room_prefix)
        self.bot_user_id = bot_user_id
        self.threads_as_rooms = threads_as_rooms
        self._user_names = user_names
        self._app: AsyncApp | None = None
        self._names: OrderedDict[str, str] = OrderedDict()
        self._threads: OrderedDict[tuple[str, str], str] = OrderedDict()

    def room(self, channel: str, thread_ts: str | None = None) -> str:
        if self.threads_as_rooms and thread_ts:
            return room_id(self.room_prefix, f"{channel}:{thread_ts}")
        return room_id(self.room_prefix, channel)

    # ------------------------------------------------------------- wiring

    def attach(self, app: AsyncApp) -> None:
        """Listen to ``app``'s ``message``, ``reaction_added`` and ``reaction_removed``."""
        self._app = app

        async def on_event(event: dict[str, Any], context: Mapping[str, Any]) -> None:
            await self.handle(event, bot_user_id=context.get("bot_user_id"))

        for name in ("message", "reaction_added", "reaction_removed"):
            app.event(name)(on_event)

    async def handle(
        self, event: Mapping[str, Any], *, bot_user_id: str | None = None
    ) -> bool | None:
        """One event, as the Events API sends it (the envelope or its ``event``): what
        the engine call returned (None: nothing to record)."""
        if event.get("type") == "event_callback" and isinstance(event.get("event"), Mapping):
            event = event["event"]
        kind, subtype = event.get("type"), event.get("subtype")
        bot = self.bot_user_id or bot_user_id
        if kind in ("reaction_added", "reaction_removed"):
            return await self._reaction(event, added=kind == "reaction_added")
        if kind != "message":
            return None
        if subtype == "message_changed":
            return await self._changed(event, bot)
        if subtype == "message_deleted":
            return await self._deleted(event)
        if subtype not in _TURN_SUBTYPES:
            return None
        return await self._message(event, bot)

    # ------------------------------------------------------------- events

    async def _message(self, event: Mapping[str, Any], bot: str | None) -> bool | None:
        channel = str(event["channel"])
        thread = event.get("thread_ts")
        self._remember_thread(channel, str(event["ts"]), thread)
        turn = await self.turn(event, bot)
        room = self.room(channel, thread)
        # Slack retries an event it thinks was not received: it lands once.
        return await self._append_turn(
            room, turn, f"{self.room_prefix}:{channel}:{turn.message_id}"
        )

    async def _changed(self, event: Mapping[str, Any], bot: str | None) -> bool | None:
        message = event.get("message")
        if not isinstance(message, Mapping):
            return None
        previous = event.get("previous_message")
        if (
            isinstance(previous, Mapping)
            and previous.get("text") == message.get("text")
            and (previous.get("files") == message.get("files"))
        ):
            return None  # a link unfurled or a reply was counted: the text did not change
        channel = str(event["channel"])
        turn = await self.turn({**message, "channel": channel}, bot)
        room = self.room(channel, message.get("thread_ts"))
        return await self._update_turn(room, turn)

    async def _deleted(self, event: Mapping[str, Any]) -> bool | None:
        channel = str(event["channel"])
        previous = event.get("previous_message")
        thread = previous.get("thread_ts") if isinstance(previous, Mapping) else None
        room = self.room(channel, thread)
        return await self._guard(
            room, self.manager.mark_deleted_async(room, str(event["deleted_ts"]), now_iso())
        )

    async def _reaction(self, event: Mapping[str, Any], *, added: bool) -> bool | None:
        item = event.get("item")
        if not isinstance(item, Mapping) or item.get("type") != "message":
            return None  # a reaction to a file or a file comment
        channel, ts = str(item["channel"]), str(item["ts"])
        room = self.room(channel, self._threads.get((channel, ts)))
        emoji = f":{event['reaction']}:"
        call = self.manager.add_reaction_async if added else self.manager.remove_reaction_async
        return await self._guard(room, call(room, ts, emoji, str(event["user"])))

    # ------------------------------------------------------------- mapping

    async def turn(self, message: Mapping[str, Any], bot: str | None) -> Turn:
        """A message as the engine records it."""
        user = message.get("user")
        own = bot is not None and user == bot
        if user:
            display = await self.display_name(str(user))
        else:  # an integration's bot_message: its own username
            display = str(message.get("username") or message.get("bot_id") or "bot")
        files = message.get("files") or []
        return Turn(
            message_id=str(message["ts"]),
            text=await self.readable(str(message.get("text") or "")),
            role="assistant" if own else "user",
            name=None if own else safe_name(display, user or message.get("bot_id")),
            author=None if own else label(display),
            attachments=[
                Attachment(
                    str(f.get("name") or f.get("title") or "file"),
                    str(f.get("url_private") or f.get("permalink") or ""),
                    f.get("mimetype"),
                    f.get("size"),
                )
                for f in files
                if isinstance(f, Mapping)
            ],
        )

    async def readable(self, text: str) -> str:
        """Slack's markup as people read it: ``@name``, ``#channel``, ``@here``, links."""
        users = {match.group(1) for match in _USER_MENTION.finditer(text)}
        names = {user: await self.display_name(user) for user in users}
        text = _USER_MENTION.sub(lambda m: f"@{label(names[m.group(1)])}", text)
        text = _CHANNEL_MENTION.sub(lambda m: f"#{label(m.group(2) or m.group(1))}", text)
        text = _SPECIAL.sub(r"@\1", text)
        text = _SUBTEAM.sub(lambda m: f"@{label(m.group(1) or 'group')}", text)
        text = _LINK.sub(
            lambda m: f"{m.group(2)} ({m.group(1)})" if m.group(2) else m.group(1), text
        )
        return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")

    async def display_name(self, user: str) -> str:
        if user in self._names:
            return self._names[user]
        name: str | None = None
        try:
            if self._user_names is not None:
                name = await self._user_names(user)
            elif self._app is not None:
                info = await self._app.client.users_info(user=user)
                profile = (info.get("user") or {}).get("profile") or {}
                name = profile.get("display_name") or profile.get("real_name")
        except Exception as exc:  # a rate limit or a missing scope: the id will do
            logger.warning("slack: could not look up user %s: %s", user, exc)
        remember(self._names, user, name or user, _THREAD_MEMORY)
        return self._names[user]

    def _remember_thread(self, channel: str, ts: str, thread: object) -> None:
        if not self.threads_as_rooms or not thread:
            return
        remember(self._threads, (channel, ts), str(thread), _THREAD_MEMORY)
