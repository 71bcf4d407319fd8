"""What consolidation hands back: results, archived batches, the summariser's signature."""

from __future__ import annotations

import logging
from collections.abc import (
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._entries import (
    SUMMARY_ID_PREFIX,
    Entry,
)
from .summarizer import transcript_line

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


# ----------------------------------------------------------------- public records


#: ``await summarize(prompt, turns) -> summary text``: ``prompt`` is the rendered
#: ``consolidation`` template (it carries the previous rolling summary, which the
#: new one must merge); ``turns`` are the OpenAI-chat messages to fold, oldest
#: first, exactly as the model would have seen them.
Summarizer = Callable[[str, list[Entry]], Awaitable[str]]


def format_transcript(turns: Sequence[Mapping[str, Any]]) -> str:
    """The turns as plain text, one block per turn, for a model to read."""
    return "\n\n".join(transcript_line(turn) for turn in turns)


@dataclass(frozen=True, slots=True)
class ConsolidationResult:
    """What one ``consolidate`` call did.

    ``outcome`` is ``"folded"``, ``"nothing_to_fold"`` (the window is short
    enough, or changed under us and now is), or ``"conflict"`` (it kept
    changing for ``max_attempts`` folds; nothing was written), or
    ``"waiting_for_cursors"`` (there are turns to fold, but a cursor of
    ``wait_for_cursors`` has not read them yet).
    """

    room_id: str
    outcome: Literal["folded", "nothing_to_fold", "conflict", "waiting_for_cursors"]
    folded: int = 0
    seq: int | None = None
    attempts: int = 0
    summarizer_calls: int = 0

    @property
    def summary_id(self) -> str | None:
        return None if self.seq is None else f"{SUMMARY_ID_PREFIX}{self.seq}"


@dataclass(frozen=True, slots=True)
class ArchiveBatch:
    """One fold: the raw turns that left the window and the summary that replaced them.

    ``turns`` are the stored entries, oldest first, with their ``message_id``.
    ``replaces`` names the previous summary merged into this one.
    """

    seq: int
    summary_id: str
    summary: str
    replaces: str | None
    folded_at: str
    turns: list[Entry]
    corrupt_rows: int = 0
