"""SPEC §32: the python-telegram-bot binding, fed Bot API updates through a real
``Application`` (``Update.de_json`` builds each one, ``process_update`` routes it).

The application's HTTP layer is PTB's own extension point, ``BaseRequest``: here
it answers ``getMe`` (which ``initialize`` calls) from memory, so no test needs
the network."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from telegram import Update
from telegram.ext import Application
from telegram.request import BaseRequest, RequestData

from conversation import ConversationManager
from conversation.platforms.telegram import Binding

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
BOT = {"id": 777, "is_bot": True, "first_name": "Helper", "username": "helper_bot"}
ANN = {"id": 11, "is_bot": False, "first_name": "Ann", "last_name": "[admin]"}
BOB = {"id": 12, "is_bot": False, "first_name": "Bøb"}
CHAT = {"id": -1001, "type": "supergroup", "title": "Team", "is_forum": True}


class OfflineRequest(BaseRequest):
    """Answers the one call ``Application.initialize`` makes."""

    @property
    def read_timeout(self) -> float | None:
        return None

    async def initialize(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    async def do_request(
        self, url: str, method: str, request_data: RequestData | None = None, *args: Any, **kw: Any
    ) -> tuple[int, bytes]:
        assert url.endswith("/getMe"), f"no network in tests: {url}"
        return 200, orjson.dumps({"ok": True, "result": BOT})


async def file_url(file_id: str) -> str | None:
    return f"https://cdn.example/{file_id}.jpg"


class Worker:
    def __init__(self, manager: ConversationManager, **options: Any) -> None:
        self.manager = manager
        self.application = (
            Application.builder().token("777:TEST").request(OfflineRequest())
            .get_updates_request(OfflineRequest()).updater(None).build()
        )  # fmt: skip
        self.binding = Binding(manager, file_url=file_url, **options)
        self.binding.attach(self.application)
        self.updates = 0

    async def deliver(self, kind: str, payload: dict[str, Any]) -> None:
        """Process one update, as the Bot API sends it."""
        self.updates += 1
        update = Update.de_json({"update_id": self.updates, kind: payload}, self.application.bot)
        assert update is not None
        await self.application.process_update(update)

    async def texts(self, room: str) -> list[Any]:
        await self.manager.ensure_fresh_from_redis(room)
        return [m["content"] for m in await self.manager.get_messages_async(room)]


def message(
    message_id: int, text: str, sender: dict[str, Any] = ANN, **extra: Any
) -> dict[str, Any]:
    return {"message_id": message_id, "date": 1712345678, "chat": CHAT, "from": sender,
            "text": text, **extra}  # fmt: skip


def reaction(
    message_id: int, user: dict[str, Any], old: list[Any], new: list[Any]
) -> dict[str, Any]:
    return {"chat": CHAT, "message_id": message_id, "user": user, "date": 1712345679,
            "old_reaction": old, "new_reaction": new}  # fmt: skip


THUMBS = {"type": "emoji", "emoji": "👍"}
FIRE = {"type": "emoji", "emoji": "🔥"}
CUSTOM = {"type": "custom_emoji", "custom_emoji_id": "5368324170671202286"}


@pytest.fixture
async def workers(redis_client: aioredis.Redis, make_manager: Make) -> AsyncIterator[list[Worker]]:
    pair = [Worker(make_manager(redis_client)), Worker(make_manager(redis_client))]
    for worker in pair:
        await worker.application.initialize()
    yield pair
    for worker in pair:
        await worker.application.shutdown()


async def test_messages_photos_and_files(workers: list[Worker]) -> None:
    bot = workers[0]
    photo = [
        {"file_id": "small", "file_unique_id": "s", "width": 90, "height": 90},
        {"file_id": "big", "file_unique_id": "b", "width": 1280, "height": 960, "file_size": 99},
    ]
    await bot.deliver("message", {**message(5, "", caption="look @bob_t"), "photo": photo})
    document = {"file_id": "doc1", "file_unique_id": "d", "file_name": "plan [v2].pdf",
                "mime_type": "application/pdf", "file_size": 1234}  # fmt: skip
    await bot.deliver("message", {**message(6, "", sender=BOB), "document": document})
    await bot.deliver("message", message(7, "noted", sender=BOT))
    assert await bot.manager.get_messages_async("telegram:-1001") == [
        {"role": "user", "name": "Ann_admin", "content": [
            {"type": "text", "text": "[Message ID: 5] Ann (admin): look @bob_t"},
            {"type": "image_url", "image_url": {"url": "https://cdn.example/big.jpg"}},
        ]},
        {"role": "user", "name": "Bob", "content":
            "[Message ID: 6] Bøb: (file: plan (v2).pdf, application/pdf, 1234 bytes) file_id:doc1"},
        {"role": "assistant", "content": "[Message ID: 7] noted"},
    ]  # fmt: skip


async def test_reactions_edits_out_of_order_and_redelivered(workers: list[Worker]) -> None:
    inference, agents = workers
    await agents.deliver("edited_message", message(9, "teh plan fixed", edit_date=1712345700))
    await agents.deliver("message_reaction", reaction(9, BOB, [], [THUMBS]))
    await agents.deliver("message_reaction", reaction(9, ANN, [], [THUMBS, CUSTOM]))
    await agents.deliver("message_reaction", reaction(9, BOB, [], [THUMBS]))  # delivered again
    await inference.deliver("message", message(9, "teh plan"))
    await agents.deliver("message", message(9, "teh plan"))  # delivered again: once
    assert await agents.texts("telegram:-1001") == [
        "[Message ID: 9] [Reactions: 👍 2, :custom: 1] Ann (admin): teh plan fixed"
    ]
    # Bob changes his mind: one update says before and after.
    await inference.deliver("message_reaction", reaction(9, BOB, [THUMBS], [FIRE]))
    assert await agents.texts("telegram:-1001") == [
        "[Message ID: 9] [Reactions: 👍 1, :custom: 1, 🔥 1] Ann (admin): teh plan fixed"
    ]


async def test_anonymous_reaction_counts_set_the_summary(workers: list[Worker]) -> None:
    bot = workers[0]
    channel = {"id": -1002, "type": "channel", "title": "News"}
    post = {"message_id": 3, "date": 1712345678, "text": "news", "chat": channel,
            "sender_chat": channel}  # fmt: skip
    await bot.deliver("channel_post", post)
    counts = [{"type": THUMBS, "total_count": 2}, {"type": FIRE, "total_count": 5}]
    await bot.deliver("message_reaction_count", {
        "chat": {"id": -1002, "type": "channel", "title": "News"}, "message_id": 3,
        "date": 1712345680, "reactions": counts})  # fmt: skip
    assert await bot.texts("telegram:-1002") == [
        "[Message ID: 3] [Reactions: 🔥 5, 👍 2] News: news"
    ]


async def test_topics_as_rooms_and_raw_updates(
    redis_client: aioredis.Redis, make_manager: Make
) -> None:
    bot = Worker(make_manager(redis_client), topics_as_rooms=True)
    await bot.application.initialize()
    try:
        await bot.deliver("message", message(20, "in general"))
        topic = message(21, "in a topic", message_thread_id=4, is_topic_message=True)
        assert await bot.binding.handle({"update_id": 99, "message": topic})
        await bot.deliver("message_reaction", reaction(21, BOB, [], [THUMBS]))
        hostile = {"type": "emoji", "emoji": "👍] [Reactions: 👍 99"}
        refused = {"update_id": 100, "message_reaction": reaction(21, ANN, [], [hostile])}
        assert await bot.binding.handle(refused) is False
        assert await bot.texts("telegram:-1001") == ["[Message ID: 20] Ann (admin): in general"]
        assert await bot.texts("telegram:-1001:4") == [
            "[Message ID: 21] [Reactions: 👍 1] Ann (admin): in a topic"
        ]
    finally:
        await bot.application.shutdown()
