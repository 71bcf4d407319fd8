"""Token budgets (SPEC §4.20): fit a window into N tokens without splitting tool groups.

Counts are exact with ``tiktoken`` when it is installed (``cl100k_base``) and
its encoding loads (tiktoken downloads it on first use: offline, with no cached
copy, it cannot, and counts fall back to the estimate with one warning), and
otherwise estimated at four characters a token plus a small per-message
overhead, the rule of thumb OpenAI documents for English text. Media parts are
counted at a flat rate: their real cost depends on the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any

logger = logging.getLogger(__name__)

Message = dict[str, Any]

PER_MESSAGE_OVERHEAD = 4
MEDIA_PART_TOKENS = 85


@cache
def _text_counter() -> Callable[[str], int]:
    try:
        import tiktoken  # noqa: PLC0415 - optional dependency, looked up once
    except ImportError:
        return lambda text: (len(text) + 3) // 4
    try:
        encoding = tiktoken.get_encoding("cl100k_base")
    except Exception as exc:  # tiktoken raises whatever its download raised
        logger.warning(
            "tiktoken cannot load cl100k_base (%s); token counts are estimated instead", exc
        )
        return lambda text: (len(text) + 3) // 4
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def estimate_tokens(message: Message) -> int:
    count = _text_counter()
    total = PER_MESSAGE_OVERHEAD
    content = message.get("content")
    if isinstance(content, str):
        total += count(content)
    elif isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            total += count(text) if isinstance(text, str) else MEDIA_PART_TOKENS
    for call in message.get("tool_calls") or ():
        function = call.get("function", {}) if isinstance(call, dict) else {}
        total += count(str(function.get("name", ""))) + count(str(function.get("arguments", "")))
    return total


def _groups(window: Sequence[Message]) -> list[list[Message]]:
    """Units that are kept or dropped whole: an assistant call with its tool results."""
    groups: list[list[Message]] = []
    for message in window:
        if message.get("role") == "tool" and groups and _opens_or_continues_calls(groups[-1]):
            groups[-1].append(message)
        else:
            groups.append([message])
    return groups


def _opens_or_continues_calls(group: list[Message]) -> bool:
    return bool(group[0].get("tool_calls"))


def fit_to_budget(messages: Sequence[Message], budget: int) -> list[Message]:
    """Keep the system prompt(s), the newest user turn, and the newest turns that fit.

    The turn being answered comes first: the newest user message survives any
    budget that fits it, then what follows it (tool calls and results an agent
    is in the middle of), newest first. The first user message, which often
    states the task, is kept next when there is room; then older turns, newest
    first. Turns are dropped from the middle, a tool-call group is kept or
    dropped whole, and the result keeps the original order. The input is not
    changed.
    """
    if budget < 0:
        raise ValueError(f"token budget must be >= 0, got {budget}")
    head: list[Message] = []
    rest = list(messages)
    # The system prompt, and the consolidation summary that follows it.
    while rest and rest[0].get("role") == "system":
        head.append(rest.pop(0))
    groups = _groups(rest)
    costs = [sum(estimate_tokens(m) for m in group) for group in groups]
    users = [i for i, group in enumerate(groups) if group[0].get("role") == "user"]
    newest = users[-1] if users else len(groups)
    room = budget - sum(estimate_tokens(m) for m in head)
    kept: set[int] = set()

    def keep_while_it_fits(indexes: Iterable[int]) -> None:
        nonlocal room
        for index in indexes:
            if costs[index] > room:
                return
            kept.add(index)
            room -= costs[index]

    keep_while_it_fits(users[-1:])
    keep_while_it_fits(range(len(groups) - 1, newest, -1))
    # Older turns only around the question being answered, never instead of it.
    if not users or newest in kept:
        keep_while_it_fits(i for i in users[:1] if i != newest)
        keep_while_it_fits(i for i in range(newest - 1, -1, -1) if i not in kept)
    return head + [m for index in sorted(kept) for m in groups[index]]
