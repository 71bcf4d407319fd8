"""The offline default summariser: extractive, deterministic, cited."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import (
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .._entries import (
    MARKER_RE,
    Entry,
    first_text,
)

if TYPE_CHECKING:
    pass


from .config import DEFAULT_SUMMARY_WORDS

logger = logging.getLogger(__name__)


#: The default summariser yields to the loop after this long. Another task waiting
#: on a timer resumes about three slices later (the timer, its future and the task's
#: step each take a turn of the loop behind the summariser's next slice).
_SUMMARY_SLICE_SECONDS = 0.002


# ----------------------------------------------------------- the default summariser


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_IMPORTANT = re.compile(
    r"\b(?:will|won't|shall|promis\w*|agree\w*|decid\w*|deadline|due|tomorrow|tonight|"
    r"next (?:week|month|monday|tuesday|wednesday|thursday|friday|saturday|sunday)|"
    r"by (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|the end)|todo|must|"
    r"need(?:s)? to|remember|don't forget|schedul\w*|meeting|plan\w*|booked|confirm\w*)\b|'ll\b",
    re.IGNORECASE,
)
_FACT = re.compile(r"\d|https?://|@\w")
_TAGS = re.compile(r"\s*\[(?:deleted at [^\[\]\n]*|Reactions: [^\[\]\n]*)\]")
_WORD = re.compile(r"\S+")
_PROMPT_SUMMARY = re.compile(r"<summary>\s*\n(.*?)\n\s*</summary>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ExtractiveSummarizer:
    """The offline default: a deterministic, extractive rolling summary.

    From each turn it keeps the one sentence that looks most worth keeping
    (commitments, plans and decisions first, then questions, then facts with
    numbers or links), attributed and cited as ``(msg <id>)``; deleted messages
    are recorded as withdrawn, tool results are left out. The previous summary's
    lines come first; when the result is over the word budget, the oldest of the
    least important lines go first. Same input, same summary.
    """

    max_words: int | None = None
    sentence_chars: int = 200
    ellipsis: str = field(default="…", repr=False)

    async def __call__(self, prompt: str, turns: list[Entry]) -> str:
        """The summariser protocol; the previous summary is read from the prompt.

        That works with the packaged template (it wraps the summary in
        ``<summary>`` tags). ``consolidate`` with no summariser calls
        :meth:`summarize` with the previous summary directly instead.
        """
        previous = _PROMPT_SUMMARY.search(prompt)
        return self.summarize(turns, previous.group(1) if previous else None)

    def summarize(
        self,
        turns: Sequence[Entry],
        previous_summary: str | None,
        max_words: int = DEFAULT_SUMMARY_WORDS,
    ) -> str:
        lines = _previous_lines(previous_summary)
        for turn in turns:
            line = self._line(turn)
            if line is not None:
                lines.append(line)
        return _joined(lines, self.max_words or max_words)

    async def summarize_rows(
        self,
        rows: Sequence[bytes],
        previous_summary: str | None,
        max_words: int = DEFAULT_SUMMARY_WORDS,
    ) -> str:
        """``summarize`` of stored rows, parsed one at a time, yielding to the loop
        every few milliseconds: a fold of a thousand turns with images never holds
        the loop (nor keeps every parsed turn alive) for the whole summary."""
        lines = _previous_lines(previous_summary)
        words = [_words(line) for _, line in lines]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for row in rows:
            line = self._line(orjson.loads(row))  # its message_id is not read
            if line is not None:
                lines.append(line)
                words.append(_words(line[1]))  # counted here, in the slices
            if loop.time() - started > _SUMMARY_SLICE_SECONDS:
                await asyncio.sleep(0)
                started = loop.time()
        return _joined(lines, self.max_words or max_words, words)

    def _line(self, turn: Entry) -> tuple[int, str] | None:
        role = turn.get("role")
        if role == "tool":
            return None
        who = turn.get("name") or role
        content = turn.get("content")
        text = first_text(content) or ""
        media = (
            sum(1 for p in content if not (isinstance(p, dict) and p.get("type") == "text"))
            if isinstance(content, list)
            else 0
        )
        cite = ""
        marker = MARKER_RE.search(text)
        if marker is not None:
            cite = f" (msg {marker.group(1).strip()})"
            rest = text[marker.end() :]
            tags = re.match(r"(?:" + _TAGS.pattern + r")*", rest)
            zone = tags.group(0) if tags else ""
            if "[deleted at " in zone:
                return 1, f"- {who} withdrew a message{cite}."
            text = text[: marker.start()] + rest[len(zone) :]
        text = _TAGS.sub("", text).strip()
        text = MARKER_RE.sub(lambda m: f"(msg {m.group(1).strip()})", text)
        calls = turn.get("tool_calls") or []
        names = [
            str(call.get("function", {}).get("name", "a tool"))
            for call in calls
            if isinstance(call, dict)
        ]
        sentences = [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]
        parts = []
        importance = 1
        if names:
            parts.append("used " + ", ".join(names))
        if sentences:
            ranked = [(_importance(s), -i, s) for i, s in enumerate(sentences)]
            importance, _, best = max(ranked)
            parts.append(self._clip(best))
        if media:
            parts.append(f"shared {media} attachment{'s' if media > 1 else ''}")
        if not parts:
            return None
        return importance, f"- {who}{cite}: " + "; ".join(parts)

    def _clip(self, sentence: str) -> str:
        if len(sentence) <= self.sentence_chars:
            return sentence
        cut = sentence[: self.sentence_chars].rsplit(" ", 1)[0]
        return cut.rstrip(",;:") + self.ellipsis


def _previous_lines(previous_summary: str | None) -> list[tuple[int, str]]:
    return [
        (_importance(line), line.strip())
        for line in (previous_summary or "").splitlines()
        if line.strip()
    ]


def _joined(lines: list[tuple[int, str]], budget: int, words: list[int] | None = None) -> str:
    if not lines:
        return "- Nothing worth keeping was said."
    return "\n".join(_fit(lines, budget, words))


def _words(line: str) -> int:
    return len(_WORD.findall(line))


def _importance(text: str) -> int:
    if _IMPORTANT.search(text):
        return 3
    if "?" in text:
        return 2
    return 2 if _FACT.search(text) else 1


def _fit(lines: list[tuple[int, str]], budget: int, words: list[int] | None = None) -> list[str]:
    """Drop the oldest least important lines until the words fit (keeping the newest).

    ``words``: each line's word count, if the caller counted them already.
    """
    if words is None:
        words = [_words(line) for _, line in lines]
    total = sum(words)
    dropped: set[int] = set()
    order = sorted(range(len(lines) - 1), key=lambda i: (lines[i][0], i))
    for index in order:
        if total <= budget:
            break
        dropped.add(index)
        total -= words[index]
    return [line for i, (_, line) in enumerate(lines) if i not in dropped]


def transcript_line(turn: Mapping[str, Any]) -> str:
    who = str(turn.get("name") or turn.get("role"))
    content = turn.get("content")
    if isinstance(content, str):
        text = content
    else:
        pieces = []
        for part in content or []:
            if isinstance(part, dict) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            elif isinstance(part, dict):
                pieces.append(f"({part.get('type', 'attachment')} attachment)")
        text = "\n".join(pieces)
    if turn.get("role") == "tool":
        return f"tool result for {turn.get('tool_call_id', '?')}: {text}"
    calls = turn.get("tool_calls")
    if calls:
        called = ", ".join(
            f"{call.get('function', {}).get('name', '?')}"
            f"({call.get('function', {}).get('arguments', '')})"
            for call in calls
            if isinstance(call, dict)
        )
        text = f"{text}\n(called {called})" if text else f"(called {called})"
    return f"{who}: {text}"
