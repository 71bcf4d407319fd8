"""What every binding maps the same way: rooms, markers, names, attachments, and the
guarded engine calls (``BindingBase``)."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Final, TypeVar

from .._errors import InvalidMessage
from .._manager import ConversationManager

#: The pattern OpenAI checks ``messages[].name`` against (the API's own error text:
#: "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'"), 64 at most.
NAME_RE: Final = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_NOT_NAME: Final = re.compile(r"[^a-zA-Z0-9_-]+")
# What a platform user's text may not put into the prompt's structure: brackets
# would forge markers and tags, control characters would break lines.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
MAX_LABEL_CHARS: Final = 80
# Latin letters that NFKD does not split into an ASCII letter and a mark.
_FOLD: Final = str.maketrans(
    {"ø": "o", "Ø": "O", "ß": "ss", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE", "đ": "d",
     "Đ": "D", "ł": "l", "Ł": "L", "þ": "th", "Þ": "Th", "ð": "d", "Ð": "D"}
)  # fmt: skip


def safe_name(display: str | None, fallback: object) -> str:
    """``display`` as an OpenAI ``name``: accents folded to ASCII, anything else
    outside ``[a-zA-Z0-9_-]`` collapsed to ``_``, at most 64 characters; a name
    with nothing left is ``user_<fallback>``."""
    text = (display or "").translate(_FOLD)
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = _NOT_NAME.sub("_", folded).strip("_")[:64].strip("_")
    if not name:
        name = _NOT_NAME.sub("_", f"user_{fallback}")[:64]
    return name


def label(text: str | None) -> str:
    """A platform string shown inline (an author's name, a file name): one line, no
    brackets, bounded."""
    cleaned = _CONTROL.sub(" ", (text or "").replace("\n", " ").replace("\r", " "))
    cleaned = cleaned.replace("[", "(").replace("]", ")").strip()
    return cleaned[:MAX_LABEL_CHARS] or "unknown"


_K = TypeVar("_K")
_V = TypeVar("_V")


def remember(memory: OrderedDict[_K, _V], key: _K, value: _V, cap: int) -> None:
    """Store ``key``: a platform fact a later event needs but does not carry (a
    reaction's thread, a user's name), bounded so a busy workspace cannot grow it:
    past ``cap`` the oldest entry is forgotten."""
    memory[key] = value
    if len(memory) > cap:
        memory.popitem(last=False)


def room_id(prefix: str, channel: object) -> str:
    return f"{prefix}:{channel}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Attachment:
    """A file a message carries, as every platform describes one."""

    name: str
    url: str
    content_type: str | None = None
    size: int | None = None

    @property
    def is_image(self) -> bool:
        return (self.content_type or "").startswith("image/")

    def line(self) -> str:
        kind = f", {label(self.content_type)}" if self.content_type else ""
        size = f", {self.size} bytes" if self.size is not None else ""
        return f"(file: {label(self.name)}{kind}{size}) {self.url}"


@dataclass(slots=True)
class Turn:
    """One platform message, mapped: what ``append`` takes."""

    message_id: str
    text: str
    role: str = "user"
    name: str | None = None
    author: str | None = None  # shown before the text (None: the bot's own message)
    attachments: Sequence[Attachment] = field(default_factory=list)

    def content(self) -> str | list[dict[str, Any]]:
        """``[Message ID: id] Author: text`` (files as text lines), and each image
        as an ``image_url`` part after it."""
        head = f"[Message ID: {self.message_id}] "
        if self.author is not None:
            head += f"{self.author}: "
        lines = [self.text] if self.text else []
        lines.extend(a.line() for a in self.attachments if not a.is_image)
        text = head + "\n".join(lines)
        images = [a for a in self.attachments if a.is_image]
        if not images:
            return text.rstrip()
        return [
            {"type": "text", "text": text.rstrip()},
            *({"type": "image_url", "image_url": {"url": a.url}} for a in images),
        ]


class BindingBase:
    """What every binding does once a platform event is mapped: the engine call, with
    input the engine refuses (a hostile emoji, an oversized text) logged as ``refused``
    instead of raised into the platform library's event loop."""

    #: Each binding's own logger and the word its platform uses ("slack event").
    _logger: ClassVar[logging.Logger]
    _refused: ClassVar[str]

    def __init__(self, manager: ConversationManager, *, room_prefix: str) -> None:
        self.manager = manager
        self.room_prefix = room_prefix

    async def _guard(self, room: str, call: Awaitable[bool | None]) -> bool | None:
        try:
            return await call
        except InvalidMessage as exc:
            self._logger.warning("room %s: %s refused: %s", room, self._refused, exc)
            return False

    async def _append_turn(self, room: str, turn: Turn, idempotency_key: str) -> bool:
        """Append ``turn``; a platform's redelivery carries the same ``idempotency_key``,
        so it lands once whichever worker gets it."""
        appended = await self._guard(
            room,
            self.manager.append_async(
                room,
                turn.role,
                turn.content(),
                message_id=turn.message_id,
                name=turn.name,
                idempotency_key=idempotency_key,
            ),
        )
        return appended is not False  # append_async answers None

    async def _update_turn(self, room: str, turn: Turn) -> bool | None:
        """An edited message's new content in place of the old."""
        return await self._guard(
            room, self.manager.update_message_async(room, turn.message_id, turn.content())
        )
