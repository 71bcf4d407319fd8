"""Terminal output of the operator tools: exit codes, colours, tables, progress."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import orjson

logger = logging.getLogger(__name__)
EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure reported as one line on stderr and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_UNREACHABLE) -> None:
        self.code = code
        super().__init__(message)


# ------------------------------------------------------------------ output


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MARKER = re.compile(r"\[Message ID: [^\[\]\n]*\]")
_DELETED = re.compile(r"\[deleted at [^\[\]\n]*\]")
_REACTIONS = re.compile(r"\[Reactions: [^\[\]\n]*\]")
_MEDIA = re.compile(r"<(?:image|file|audio|video|part) [^<>\n]*>")
_TOOL = re.compile(r"(?:→|↩) [^\s(:]+")

_BOLD, _DIM, RED, GREEN, YELLOW, BLUE, MAGENTA, CYAN = (
    "1",
    "2",
    "31",
    "32",
    "33",
    "34",
    "35",
    "36",
)
_ROLE_COLOURS = {"user": GREEN, "assistant": BLUE, "system": MAGENTA, "tool": YELLOW}


@dataclass(frozen=True, slots=True)
class Palette:
    """ANSI colours when writing to a terminal, plain text otherwise."""

    enabled: bool

    @classmethod
    def for_stream(cls, stream: IO[str], choice: str = "auto") -> Palette:
        if choice == "always":
            return cls(True)
        if choice == "never" or os.environ.get("NO_COLOR"):
            return cls(False)
        isatty = getattr(stream, "isatty", None)
        return cls(bool(isatty and isatty()))

    def paint(self, text: str, *codes: str) -> str:
        if not self.enabled or not text or not codes:
            return text
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"

    def role(self, role: str) -> str:
        return self.paint(role, _ROLE_COLOURS.get(role, _BOLD))

    def ok(self, text: str) -> str:
        return self.paint(text, GREEN, _BOLD)

    def bad(self, text: str) -> str:
        return self.paint(text, RED, _BOLD)

    def dim(self, text: str) -> str:
        return self.paint(text, _DIM)

    def bold(self, text: str) -> str:
        return self.paint(text, _BOLD)

    def highlight(self, text: str) -> str:
        """Colour the engine's markers, media placeholders and tool arrows in ``text``."""
        if not self.enabled:
            return text
        text = _MARKER.sub(lambda m: self.paint(m.group(0), CYAN), text)
        text = _DELETED.sub(lambda m: self.paint(m.group(0), RED, _BOLD), text)
        text = _REACTIONS.sub(lambda m: self.paint(m.group(0), YELLOW, _BOLD), text)
        text = _MEDIA.sub(lambda m: self.paint(m.group(0), MAGENTA), text)
        return _TOOL.sub(lambda m: self.paint(m.group(0), YELLOW), text)


def visible_width(text: str) -> int:
    """Terminal columns ``text`` takes: ANSI codes take none, wide characters two."""
    plain = _ANSI.sub("", text)
    return sum(
        0
        if unicodedata.combining(ch) or ch == "\ufe0f"
        else 2
        if unicodedata.east_asian_width(ch) in "WF"
        else 1
        for ch in plain
    )


def truncate(text: str, width: int | None) -> str:
    """Cut plain ``text`` to ``width`` columns, ending in an ellipsis when cut."""
    if width is None or visible_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        size = visible_width(ch)
        if used + size > max(width - 1, 0):
            break
        out.append(ch)
        used += size
    return "".join(out) + "…"


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Iterable[int] = (),
    palette: Palette | None = None,
) -> list[str]:
    """Left-aligned columns (``right`` names columns aligned right); cells may hold ANSI."""
    body = [list(row) for row in rows]
    widths = [visible_width(h) for h in headers]
    for row in body:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], visible_width(cell))
    right_set = set(right)

    def line(cells: Sequence[str]) -> str:
        out = []
        for index, cell in enumerate(cells):
            pad = " " * (widths[index] - visible_width(cell))
            last = index == len(cells) - 1
            if index in right_set:
                out.append(pad + cell)
            else:
                out.append(cell if last else cell + pad)
        return "  ".join(out).rstrip()

    head = line(headers)
    lines = [palette.bold(head) if palette else head]
    lines.extend(line(row) for row in body)
    return lines


def json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", " ⏎ ").replace("\t", " ")


def describe_part(part: object) -> str:
    if not isinstance(part, Mapping):
        return "<part ?>"
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        return text if isinstance(text, str) else ""
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        url_text = str(url) if url is not None else "?"
        if url_text.startswith("data:"):
            url_text = url_text.split(",", 1)[0] + ",…"
        return f"<image {url_text}>"
    if kind == "file":
        file = part.get("file")
        name = file.get("filename") if isinstance(file, Mapping) else None
        return f"<file {name or '?'}>"
    if kind == "input_audio":
        audio = part.get("input_audio")
        fmt = audio.get("format") if isinstance(audio, Mapping) else None
        return f"<audio {fmt or '?'}>"
    if isinstance(kind, str) and "video" in kind:
        return f"<video {kind}>"
    return f"<part {kind}>"


def describe_content(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(piece for piece in map(describe_part, content) if piece)
    return repr(content)


def describe_entry(entry: Mapping[str, Any]) -> str:
    """One line for a stored entry: its text, media placeholders, tool calls or result."""
    pieces: list[str] = []
    text = describe_content(entry.get("content"))
    if entry.get("role") == "tool":
        pieces.append(f"↩ {entry.get('tool_call_id', '?')}:")
    if text:
        pieces.append(text)
    for call in entry.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            pieces.append(f"→ {function.get('name', '?')}({function.get('arguments', '')})")
        else:
            pieces.append("→ ?")
    return _one_line(" ".join(pieces))


def entry_rows(
    entries: Sequence[tuple[int, Mapping[str, Any] | None]],
    palette: Palette,
    max_chars: int | None,
) -> list[list[str]]:
    """Table rows ``[#, ROLE, NAME, CONTENT]`` for (absolute position, entry) pairs."""
    rows = []
    for position, entry in entries:
        if entry is None:
            rows.append(
                [str(position), palette.bad("corrupt"), "", palette.dim("(unreadable row)")]
            )
            continue
        role = str(entry.get("role", "?"))
        name = entry.get("name")
        content = palette.highlight(truncate(describe_entry(entry), max_chars))
        rows.append([str(position), palette.role(role), str(name or ""), content])
    return rows


def content_width(reserved: int, stream: IO[str], requested: int | None) -> int | None:
    """How many columns message text may take: ``--max-chars``, else fit a terminal."""
    if requested is not None:
        return requested if requested > 0 else None
    isatty = getattr(stream, "isatty", None)
    if isatty and isatty():
        return max(20, shutil.get_terminal_size((120, 24)).columns - reserved)
    return None


class Progress:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self._stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._width = 0
        self._text = ""

    def update(self, text: str) -> None:
        if not self.enabled or text == self._text:
            return
        self._text = text
        pad = " " * max(0, self._width - visible_width(text))
        self._stream.write("\r" + text + pad)
        self._stream.flush()
        self._width = visible_width(text)

    def done(self) -> None:
        if self.enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0
            self._text = ""
