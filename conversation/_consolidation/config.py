"""Consolidation settings: thresholds, what a fold keeps, limits of the summary and archive."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._changes.named import validate_name
from .._errors import (
    ConfigurationError,
    require_positive_int,
)

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


DEFAULT_SUMMARY_WORDS = 350


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class ConsolidationConfig:
    """When to consolidate a room, how much to keep, and where archives go.

    A room passes the threshold when it holds more turns than
    ``min(max_turns, max_fill * its window limit)`` or more than ``max_tokens``
    tokens (counted as token budgets count them), and has at least ``min_fold``
    turns older than the ``keep_recent`` most recent ones. Tool-call groups are
    never split, so a fold may keep a few more turns than ``keep_recent``.
    """

    max_turns: int = 80
    max_fill: float = 0.8
    max_tokens: int = 16_000
    keep_recent: int = 20
    min_fold: int = 4
    #: Keep the oldest user message of the window verbatim, right after the
    #: summary (some model APIs want a user turn before anything else).
    pin_first_user: bool = False
    #: Prompt template rendered for the summariser, and folders searched for it
    #: before the packaged ``prompt_templates/`` (as ``PromptRenderer`` does).
    template: str = "consolidation"
    template_dirs: tuple[str, ...] = ()
    max_summary_words: int = DEFAULT_SUMMARY_WORDS
    #: Longer summaries are cut (the summariser was asked for ``max_summary_words``).
    max_summary_chars: int = 16_000
    #: Text put before the summary in the entry the model sees.
    summary_prefix: str = "Summary of the earlier conversation:\n"
    #: Folds kept in a room's archive (oldest dropped first); 0 keeps all.
    archive_max_batches: int = 1000
    #: Bytes of archive records kept per room (oldest folds dropped first; the newest
    #: fold always stays, even alone over the cap); 0 = no byte cap.
    archive_max_bytes: int = 64 * 1024 * 1024
    #: Archive retention; ``None`` gives it the room's ``ttl_seconds``.
    archive_ttl_seconds: float | None = None
    #: Fold attempts (each on a fresh window) before giving up on a busy room.
    max_attempts: int = 3
    #: Lease a consolidation worker holds on a room while it folds it.
    lease_seconds: float = 60.0
    #: Named change-feed cursors (``set_cursor``) a fold waits for: it folds only
    #: turns every one of them has read, so a memory extractor never misses turns a
    #: summary swallowed. A cursor not set yet, or from another epoch, holds back
    #: every fold. (The window limit still trims: see docs/changes.md.)
    wait_for_cursors: Sequence[str] = ()  # kept as a tuple

    def __post_init__(self) -> None:
        names: object = self.wait_for_cursors  # a list works too; a str would be letters
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ConfigurationError("wait_for_cursors must be a list of cursor names")
        if not all(isinstance(n, str) for n in names):
            raise ConfigurationError("wait_for_cursors must be a list of cursor names")
        for name in names:
            validate_name(name)
        object.__setattr__(self, "wait_for_cursors", tuple(names))
        for name in ("max_turns", "max_tokens", "min_fold", "max_summary_words", "max_attempts"):
            require_positive_int(name, getattr(self, name))
        for name in ("keep_recent", "archive_max_batches", "archive_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be an int >= 0, got {value!r}")
        if self.max_summary_chars < 100:
            raise ConfigurationError("max_summary_chars must be at least 100")
        if not 0 < self.max_fill <= 1:
            raise ConfigurationError(f"max_fill must be in (0, 1], got {self.max_fill!r}")
        if self.archive_ttl_seconds is not None and self.archive_ttl_seconds <= 0:
            raise ConfigurationError("archive_ttl_seconds must be positive or None")
        if self.lease_seconds < 1:
            raise ConfigurationError("lease_seconds must be at least 1")
