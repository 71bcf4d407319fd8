"""conversation: an asyncio chat-history engine for multi-process LLM chat bots.

Per-room sliding windows of OpenAI-chat turns live in each worker's memory and
are mirrored to Redis by Lua scripts, so every worker converges on one history.
"""

from __future__ import annotations

from ._errors import (
    ConfigurationError,
    ConversationError,
    DrainTimeout,
    DurabilityError,
    InvalidMessage,
    InvalidRoomId,
    PersistError,
    RedisUnavailable,
    TemplateError,
)
from ._manager import ConversationManager
from ._renderer import PromptRenderer

__all__ = [
    "ConfigurationError",
    "ConversationError",
    "ConversationManager",
    "DrainTimeout",
    "DurabilityError",
    "InvalidMessage",
    "InvalidRoomId",
    "PersistError",
    "PromptRenderer",
    "RedisUnavailable",
    "TemplateError",
]
