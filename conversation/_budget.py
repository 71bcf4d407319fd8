"""Token budgets (SPEC §4.20): fit a window into N tokens without splitting tool groups.

Counts are exact with ``tiktoken`` when it is installed (``cl100k_base``), and
otherwise estimated at four characters a token plus a small per-message
overhead, the rule of thumb OpenAI documents for English text. Media parts are
counted at a flat rate: their real cost depends on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

Message = dict[str, Any]

PER_MESSAGE_OVERHEAD = 4
MEDIA_PART_TOKENS = 85


@cache
def _text_counter() -> Callable[[str], int]:
    try:
        import tiktoken  # noqa: PLC0415 - optional dependency, looked up once
    except ImportError:
        return lambda text: (len(text) + 3) // 4
    encoding = tiktoken.get_encoding("cl100k_base")
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
    """Keep the system prompt(s), the first user message and the newest turns that fit.

    Turns are dropped from the middle, a tool-call group is kept or dropped
    whole, and the result keeps the original order. The input is not changed.
    """
    if budget < 0:
        raise ValueError(f"token budget must be >= 0, got {budget}")
    head: list[Message] = []
    rest = list(messages)
    # The system prompt, and the consolidation summary that follows it.
    while rest and rest[0].get("role") == "system":
        head.append(rest.pop(0))
    used = sum(estimate_tokens(m) for m in head)
    groups = _groups(rest)
    pinned: list[Message] = []
    first_user = next((i for i, g in enumerate(groups) if g[0].get("role") == "user"), None)
    if first_user is not None:
        cost = sum(estimate_tokens(m) for m in groups[first_user])
        if used + cost <= budget:
            pinned = groups.pop(first_user)
            used += cost
        else:
            first_user = None
    recent: list[list[Message]] = []
    for group in reversed(groups):
        cost = sum(estimate_tokens(m) for m in group)
        if used + cost > budget:
            break
        recent.append(group)
        used += cost
    recent.reverse()
    kept_ids = {id(m) for group in recent for m in group} | {id(m) for m in pinned}
    body = [m for m in rest if id(m) in kept_ids]
    return head + body
