"""LangChain's own tests with ``InMemoryChatMessageHistory`` swapped for the engine's history.

Only the constructor changes: ``InMemoryChatMessageHistory(messages=...)``
builds an ``EngineChatMessageHistory`` in a fresh room (a fresh engine room per
instance, as each in-memory history is its own store), holding ``messages``.
The tests compare stores of histories with ``==``, which for the pydantic
in-memory class compares their messages; the swapped class does the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from peer_engine import engine, fresh_prefix

from conversation.integrations.langchain import EngineChatMessageHistory

_PREFIX = fresh_prefix()


class SwappedHistory(EngineChatMessageHistory):
    def __init__(self, messages: Sequence[BaseMessage] | None = None, **_ignored: Any) -> None:
        super().__init__(engine(_PREFIX), f"lc:{uuid.uuid4().hex}")
        if messages:
            self.add_messages(messages)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EngineChatMessageHistory):
            return NotImplemented
        return self.messages == other.messages

    __hash__ = EngineChatMessageHistory.__hash__


@pytest.fixture(autouse=True)
def _swap_history_class(request: pytest.FixtureRequest) -> Iterator[None]:
    module = request.module
    if hasattr(module, "InMemoryChatMessageHistory"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(module, "InMemoryChatMessageHistory", SwappedHistory)
            yield
    else:
        yield
