"""conversation: an asyncio chat-history engine for multi-process LLM chat bots.

Per-room sliding windows of OpenAI-chat turns live in each worker's memory and
are mirrored to Redis by Lua scripts, so every worker converges on one history.
"""

from __future__ import annotations

from ._changes.feed import Change
from ._consolidation.config import ConsolidationConfig
from ._consolidation.records import ArchiveBatch, ConsolidationResult, Summarizer, format_transcript
from ._consolidation.summarizer import ExtractiveSummarizer
from ._consolidation.worker import ConsolidationWorker
from ._engine.rooms import RoomInfo
from ._errors import (
    BacklogFull,
    ConfigurationError,
    ConsolidationError,
    ConversationError,
    DrainTimeout,
    DurabilityError,
    InvalidCursor,
    InvalidExport,
    InvalidMessage,
    InvalidRoomId,
    InvalidSessionId,
    PersistError,
    RedisUnavailable,
    ReplicationTimeout,
    RoomNotEmpty,
    SessionError,
    SessionExists,
    SessionNotFound,
    TemplateError,
)
from ._manager import ConversationManager
from ._renderer import PromptRenderer
from ._sessions.store import Session, SessionInfo, SessionStore

__all__ = [
    "ArchiveBatch",
    "BacklogFull",
    "Change",
    "ConfigurationError",
    "ConsolidationConfig",
    "ConsolidationError",
    "ConsolidationResult",
    "ConsolidationWorker",
    "ConversationError",
    "ConversationManager",
    "DrainTimeout",
    "DurabilityError",
    "ExtractiveSummarizer",
    "InvalidCursor",
    "InvalidExport",
    "InvalidMessage",
    "InvalidRoomId",
    "InvalidSessionId",
    "PersistError",
    "PromptRenderer",
    "RedisUnavailable",
    "ReplicationTimeout",
    "RoomInfo",
    "RoomNotEmpty",
    "Session",
    "SessionError",
    "SessionExists",
    "SessionInfo",
    "SessionNotFound",
    "SessionStore",
    "Summarizer",
    "TemplateError",
    "format_transcript",
]
