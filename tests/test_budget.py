"""SPEC §4.20 token budgets."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from conversation import ConversationManager
from conversation._budget import estimate_tokens, fit_to_budget

pytestmark = pytest.mark.real_server

CALL = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]


def window() -> list[dict[str, object]]:
    return [
        {"role": "system", "content": "You are a bot."},
        {"role": "user", "content": "first question " * 10},
        {"role": "assistant", "content": "answer " * 10},
        {"role": "assistant", "content": "", "tool_calls": CALL},
        {"role": "tool", "content": "result " * 10, "tool_call_id": "c1"},
        {"role": "user", "content": "latest " * 10},
        {"role": "assistant", "content": "reply " * 10},
    ]


def test_budget_keeps_system_first_user_and_newest_turns() -> None:
    messages = window()
    costs = [estimate_tokens(m) for m in messages]
    budget = costs[0] + costs[1] + costs[5] + costs[6]
    fitted = fit_to_budget(messages, budget)
    assert fitted == [messages[0], messages[1], messages[5], messages[6]]
    assert messages == window()  # non-destructive


def test_budget_never_splits_a_tool_group() -> None:
    messages = window()
    costs = [estimate_tokens(m) for m in messages]
    # Room for the tool result but not for its assistant call: both must go.
    budget = costs[0] + costs[1] + costs[4] + costs[5] + costs[6]
    fitted = fit_to_budget(messages, budget)
    roles = [m["role"] for m in fitted]
    assert "tool" not in roles
    fitted = fit_to_budget(messages, budget + costs[3])
    assert [m["role"] for m in fitted] == [
        "system",
        "user",
        "assistant",
        "tool",
        "user",
        "assistant",
    ]


def test_large_budget_returns_everything() -> None:
    assert fit_to_budget(window(), 10**6) == window()


async def test_get_messages_async_with_budget_leaves_the_window_intact(
    any_client: aioredis.Redis, make_manager: Callable[..., ConversationManager], room: str
) -> None:
    manager = make_manager(any_client)
    for message in window()[1:]:
        await manager.append_async(
            room,
            str(message["role"]),
            str(message["content"]),
            tool_calls=message.get("tool_calls"),  # type: ignore[arg-type]
            tool_call_id=message.get("tool_call_id"),  # type: ignore[arg-type]
        )
    full = await manager.get_messages_async(room)  # no renderer: no system message
    budget = sum(estimate_tokens(m) for m in (full[0], full[-2], full[-1]))
    small = await manager.get_messages_async(room, token_budget=budget)
    assert small == [full[0], full[-2], full[-1]]
    assert await manager.get_messages_async(room) == full
