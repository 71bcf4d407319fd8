"""python-telegram-bot updates as engine calls (``pip install 'conversation[telegram]'``).

::

    binding = Binding(manager, file_url=my_resolver)   # file_id -> a URL the model may fetch
    binding.attach(application)                        # a telegram.ext.Application

Each chat is a room, ``telegram:<chat id>``; with ``topics_as_rooms=True`` a
forum topic is its own room, ``telegram:<chat id>:<topic id>``. Messages and
channel posts become ``[Message ID: <id>] <author>: <text>`` (the caption for
media); ``edited_message`` / ``edited_channel_post`` edit them;
``message_reaction`` (one user's reactions, before and after) adds and removes
reactions; ``message_reaction_count`` (anonymous reactions, counts only) sets
the summary with ``patch_reactions``. Telegram sends bots no event when a
message is deleted, so nothing here marks one deleted.

Photos need a URL: the Bot API's file links carry the bot token, so none is
ever made here. ``file_url`` (an async callable, file id -> URL or None) makes
them ``image_url`` parts — a bot typically downloads the file and returns a
``data:`` URL or its own CDN's; without it a photo is a text line.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import (
    Message,
    MessageReactionCountUpdated,
    MessageReactionUpdated,
    ReactionType,
    ReactionTypeCustomEmoji,
    ReactionTypeEmoji,
    Update,
)
from telegram.ext import Application, ContextTypes, TypeHandler

from .._manager import ConversationManager
from ._mapping import Attachment, BindingBase, Turn, label, remember, room_id, safe_name

__all__ = ["Binding"]

logger = logging.getLogger(__name__)

FileUrl = Callable[[str], Awaitable[str | None]]
#: The handler group the binding listens in: before the bot's own handlers, which
#: still all run (each group gets every update).
HANDLER_GROUP = -100
_TOPIC_MEMORY = 10_000


class Binding(BindingBase):
    """Maps a python-telegram-bot ``Application``'s updates onto ``manager``.

    ``bot_user_id``: the bot's id (its messages become ``assistant`` turns); by
    default the attached application's bot.
    """

    _logger = logger
    _refused = "telegram update"

    def __init__(
        self,
        manager: ConversationManager,
        *,
        bot_user_id: int | None = None,
        room_prefix: str = "telegram",
        topics_as_rooms: bool = False,
        file_url: FileUrl | None = None,
    ) -> None:
        super().__init__(manager, room_prefix=room_prefix)
        self.bot_user_id = bot_user_id
        self.topics_as_rooms = topics_as_rooms
        self._file_url = file_url
        self._application: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._topics: OrderedDict[tuple[int, int], int] = OrderedDict()

    def room(self, chat_id: int, topic: int | None = None) -> str:
        if self.topics_as_rooms and topic:
            return room_id(self.room_prefix, f"{chat_id}:{topic}")
        return room_id(self.room_prefix, chat_id)

    # ------------------------------------------------------------- wiring

    def attach(self, application: Application[Any, Any, Any, Any, Any, Any]) -> None:
        """Listen to every update ``application`` processes."""
        self._application = application

        async def on_update(update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
            await self.handle(update)

        application.add_handler(TypeHandler(Update, on_update), group=HANDLER_GROUP)

    async def handle(self, update: Update | dict[str, Any]) -> bool | None:
        """One update (a ``telegram.Update``, or its JSON as the Bot API sends it, which
        needs an attached application): what the engine call returned (None: nothing
        to record)."""
        if isinstance(update, dict):
            if self._application is None:
                raise TypeError("a raw update needs an attached Application to build it")
            parsed = Update.de_json(update, self._application.bot)
            assert parsed is not None
            update = parsed
        if update.message is not None or update.channel_post is not None:
            message = update.message or update.channel_post
            assert message is not None
            return await self._message(message)
        if update.edited_message is not None or update.edited_channel_post is not None:
            edited = update.edited_message or update.edited_channel_post
            assert edited is not None
            return await self._edited(edited)
        if update.message_reaction is not None:
            return await self._reaction(update.message_reaction)
        if update.message_reaction_count is not None:
            return await self._reaction_count(update.message_reaction_count)
        return None

    # ------------------------------------------------------------- updates

    async def _message(self, message: Message) -> bool | None:
        topic = self._topic_of(message)
        room = self.room(message.chat.id, topic)
        turn = await self.turn(message)
        # Telegram delivers an update again after a webhook failure: once.
        return await self._append_turn(
            room, turn, f"{self.room_prefix}:{message.chat.id}:{message.message_id}"
        )

    async def _edited(self, message: Message) -> bool | None:
        room = self.room(message.chat.id, self._topic_of(message))
        turn = await self.turn(message)
        return await self._update_turn(room, turn)

    async def _reaction(self, update: MessageReactionUpdated) -> bool | None:
        chat = update.chat.id
        room = self.room(chat, self._topics.get((chat, update.message_id)))
        if update.user is not None:
            user = str(update.user.id)
        elif update.actor_chat is not None:
            user = f"chat{update.actor_chat.id}"
        else:
            return None
        old = [_emoji(r) for r in update.old_reaction]
        new = [_emoji(r) for r in update.new_reaction]
        found: bool | None = None
        for emoji in old:
            if emoji not in new:
                found = await self._guard(
                    room, self.manager.remove_reaction_async(room, update.message_id, emoji, user)
                )
        for emoji in new:
            if emoji not in old:
                found = await self._guard(
                    room, self.manager.add_reaction_async(room, update.message_id, emoji, user)
                )
        return found

    async def _reaction_count(self, update: MessageReactionCountUpdated) -> bool | None:
        """Anonymous reactions come as counts: they set the summary (patch_reactions)."""
        chat = update.chat.id
        room = self.room(chat, self._topics.get((chat, update.message_id)))
        counts = sorted(
            ((reaction.total_count, index, _shown(reaction.type))
             for index, reaction in enumerate(update.reactions)),
            key=lambda item: (-item[0], item[1]),
        )  # fmt: skip
        summary = ", ".join(f"{shown} {count}" for count, _, shown in counts if count > 0)
        return await self._guard(
            room, self.manager.patch_reactions_async(room, update.message_id, summary)
        )

    # ------------------------------------------------------------- mapping

    async def turn(self, message: Message) -> Turn:
        """A message as the engine records it."""
        sender = message.from_user
        own = sender is not None and sender.id == self._bot_id()
        if sender is not None:
            display, fallback = sender.full_name, sender.id
        else:  # a channel post or an anonymous admin: the chat speaks
            chat = message.sender_chat or message.chat
            display, fallback = chat.title or chat.full_name or str(chat.id), chat.id
        return Turn(
            message_id=str(message.message_id),
            text=message.text or message.caption or "",
            role="assistant" if own else "user",
            name=None if own else safe_name(display, fallback),
            author=None if own else label(display),
            attachments=await self._attachments(message),
        )

    async def _attachments(self, message: Message) -> list[Attachment]:
        found: list[Attachment] = []
        if message.photo:
            largest = message.photo[-1]  # Telegram lists sizes smallest first
            url = await self._url(largest.file_id)
            if url is not None:
                found.append(Attachment("photo.jpg", url, "image/jpeg", largest.file_size))
            else:
                size = f"{largest.width}x{largest.height}"
                found.append(Attachment(f"photo {size}", f"file_id:{largest.file_id}"))
        document = message.document
        if document is not None:
            mime = document.mime_type
            is_image = (mime or "").startswith("image/")
            url = await self._url(document.file_id) if is_image else None
            if url is None and is_image:
                mime = f"{mime}, not fetched"  # a text line, not an image part
            found.append(
                Attachment(
                    document.file_name or "document",
                    url or f"file_id:{document.file_id}",
                    mime,
                    document.file_size,
                )
            )
        return found

    async def _url(self, file_id: str) -> str | None:
        if self._file_url is None:
            return None
        try:
            return await self._file_url(file_id)
        except Exception as exc:  # the file is gone or too big: a text line will do
            logger.warning("telegram: no URL for a file: %s", exc)
            return None

    def _topic_of(self, message: Message) -> int | None:
        if not (self.topics_as_rooms and message.is_topic_message and message.message_thread_id):
            return None
        topic = message.message_thread_id
        remember(self._topics, (message.chat.id, message.message_id), topic, _TOPIC_MEMORY)
        return topic

    def _bot_id(self) -> int | None:
        if self.bot_user_id is not None:
            return self.bot_user_id
        if self._application is None:
            return None
        try:
            bot_id: int = self._application.bot.id
            return bot_id
        except RuntimeError:  # not initialized yet (get_me has not run)
            return None


def _emoji(reaction: ReactionType) -> str:
    """A reaction as the engine keys it: the emoji, a custom emoji as ``<:custom:id>``,
    a paid reaction as ⭐."""
    if isinstance(reaction, ReactionTypeEmoji):
        return reaction.emoji
    if isinstance(reaction, ReactionTypeCustomEmoji):
        return f"<:custom:{reaction.custom_emoji_id}>"
    return "⭐"


def _shown(reaction: ReactionType) -> str:
    return ":custom:" if isinstance(reaction, ReactionTypeCustomEmoji) else _emoji(reaction)
