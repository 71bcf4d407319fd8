"""Reactions as events: who reacted with what, and the summary it renders to.

Platforms send reaction add and remove events, one user and one emoji at a
time; the ``[Reactions: …]`` tag wants a summary (``👍 3, 😂 1``). A message's
reactions are kept as an ordered list of ``(emoji, display, users)``: the
order is first seen, and the summary lists emoji by count, highest first, ties
in that order. With Redis the same rules run in ``lua/react.lua`` (the state
lives in the room's reactions hash, one field per message); memory-only rooms
keep a ``RoomReactions`` beside their window. The two must render alike.

Emoji and user ids come from platform users, so both are checked here before
anything is stored: an emoji can never break out of the tag (no brackets,
commas, quotes, control or bidi characters), and neither can be huge.
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import orjson

from ._entries import Entry, encode
from ._errors import InvalidMessage

MAX_EMOJI_CHARS: Final = 100
MAX_USER_ID_CHARS: Final = 256
#: Distinct emoji one message may carry (Discord allows 20, Slack 23): beyond
#: it a reaction is refused, so a tag stays a few hundred bytes.
MAX_EMOJI_PER_MESSAGE: Final = 64
#: (user, emoji) pairs one message may carry: each event re-reads the message's
#: reaction state, so this bounds its cost (about 100 KB of state at most).
MAX_REACTIONS_PER_MESSAGE: Final = 5000
#: Messages whose reactions a room tracks at least; the least recently reacted go
#: first. A reaction needs its message in the window, and at any moment the
#: messages reacted since the oldest window row arrived span at most two windows
#: (the window then, and what came since), so a room tracks twice its window
#: limit when that is more (``tracked_messages``): it never forgets a message
#: that is still shown, whatever ``max_history`` is.
MAX_TRACKED_MESSAGES: Final = 4096


def tracked_messages(window_limit: int) -> int:
    """How many messages a room with this window limit tracks (lua/react.lua alike)."""
    return max(MAX_TRACKED_MESSAGES, 2 * window_limit)


# Discord custom emoji as the gateway and message text write them.
_CUSTOM_EMOJI_RE: Final = re.compile(r"<(a?):([A-Za-z0-9_]{1,64}):([0-9]{1,25})>")
# Characters an emoji may not hold: they would end the tag or the summary, or
# need escaping in a JSON row (the Lua side splices the summary in unescaped).
_FORBIDDEN: Final = frozenset('[]{}<>,"\\`')
_BIDI_CONTROLS: Final = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e") | frozenset(
    "\u2066\u2067\u2068\u2069"
)

ADD, REMOVE, CLEAR_EMOJI, CLEAR_ALL = "+", "-", "c", "C"


@dataclass(frozen=True, slots=True)
class Emoji:
    """An emoji as stored (``key``, what events name) and as shown in the tag."""

    key: str
    display: str


def normalise_emoji(emoji: object) -> Emoji:
    """Check an emoji from a platform event; custom ones (``<:name:id>``) show as ``:name:``."""
    if not isinstance(emoji, str):
        raise InvalidMessage(f"must be a str, not {type(emoji).__name__}", field="emoji")
    if not emoji:
        raise InvalidMessage("must not be empty", field="emoji")
    if len(emoji) > MAX_EMOJI_CHARS:
        raise InvalidMessage(f"longer than {MAX_EMOJI_CHARS} characters", field="emoji")
    custom = _CUSTOM_EMOJI_RE.fullmatch(emoji)
    if custom is not None:
        # Keyed by its id alone: the name can change (a rename, a deleted emoji
        # sent without one) between a user's add and remove; the tag shows the
        # name first seen.
        return Emoji(f"<:{custom.group(3)}>", f":{custom.group(2)}:")
    for char in emoji:
        category = unicodedata.category(char)
        if (
            char in _FORBIDDEN
            or char in _BIDI_CONTROLS
            or category in ("Cc", "Cs", "Zs", "Zl", "Zp")
            or char.isspace()
        ):
            raise InvalidMessage(
                f"must not contain {char!r} (brackets, commas, quotes, spaces and control "
                "characters would break the [Reactions: …] tag)",
                field="emoji",
            )
    return Emoji(emoji, emoji)


def normalise_user_id(user_id: object) -> str:
    if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
        raise InvalidMessage(f"must be a str or int, not {type(user_id).__name__}", field="user_id")
    text = str(user_id)
    if not text:
        raise InvalidMessage("must not be empty", field="user_id")
    if len(text) > MAX_USER_ID_CHARS:
        raise InvalidMessage(f"longer than {MAX_USER_ID_CHARS} characters", field="user_id")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in text):
        raise InvalidMessage("must not contain control characters", field="user_id")
    return text


@dataclass(frozen=True, slots=True)
class ReactionEvent:
    """One event: ``action`` is ADD, REMOVE, CLEAR_EMOJI or CLEAR_ALL (emoji and user
    empty where the action needs none)."""

    action: str
    emoji: Emoji | None = None
    user: str = ""

    def as_args(self) -> tuple[str, str, str, str]:
        emoji = self.emoji or Emoji("", "")
        return self.action, emoji.key, emoji.display, self.user


class TooManyReactions(InvalidMessage):
    """A message already carries as many reactions as it may (see the limits above)."""


@dataclass(slots=True)
class MessageReactions:
    """One message's reactions, oldest emoji first."""

    emoji: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def apply(self, event: ReactionEvent) -> bool:
        """Apply one event; whether anything changed. Raises ``TooManyReactions``."""
        if event.action == CLEAR_ALL:
            changed = bool(self.emoji)
            self.emoji.clear()
            return changed
        assert event.emoji is not None
        key = event.emoji.key
        index = next((i for i, (k, _, _) in enumerate(self.emoji) if k == key), None)
        if event.action == CLEAR_EMOJI:
            if index is None:
                return False
            del self.emoji[index]
            return True
        if event.action == REMOVE:
            if index is None or event.user not in self.emoji[index][2]:
                return False
            users = self.emoji[index][2]
            users.remove(event.user)
            if not users:
                del self.emoji[index]
            return True
        if index is not None and event.user in self.emoji[index][2]:
            return False
        if sum(len(users) for _, _, users in self.emoji) >= MAX_REACTIONS_PER_MESSAGE:
            raise TooManyReactions(
                f"the message already has {MAX_REACTIONS_PER_MESSAGE} reactions", field="emoji"
            )
        if index is None:
            if len(self.emoji) >= MAX_EMOJI_PER_MESSAGE:
                raise TooManyReactions(
                    f"the message already has {MAX_EMOJI_PER_MESSAGE} distinct emoji",
                    field="emoji",
                )
            self.emoji.append((key, event.emoji.display, [event.user]))
        else:
            self.emoji[index][2].append(event.user)
        return True

    def summary(self) -> str:
        order = sorted(range(len(self.emoji)), key=lambda i: (-len(self.emoji[i][2]), i))
        return ", ".join(f"{self.emoji[i][1]} {len(self.emoji[i][2])}" for i in order)

    def counts(self) -> dict[str, int]:
        return {key: len(users) for key, _, users in self.emoji}


class RoomReactions:
    """A memory-only room's tracked reactions, by message identity, least recently used first."""

    def __init__(self) -> None:
        self._messages: dict[str, MessageReactions] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._messages)

    def get(self, identity: str, window_limit: int = 0) -> MessageReactions:
        """The message's reactions, now the most recently used (created if new)."""
        message = self._messages.pop(identity, None) or MessageReactions()
        self._messages[identity] = message
        while len(self._messages) > tracked_messages(window_limit):
            del self._messages[next(iter(self._messages))]
        return message

    def settle(self, identity: str) -> None:
        """Drop the message's entry once it holds no reactions."""
        message = self._messages.get(identity)
        if message is not None and not message.emoji:
            del self._messages[identity]

    def forget(self, identity: str) -> None:
        self._messages.pop(identity, None)


@dataclass(frozen=True, slots=True)
class TagSlot:
    """A row cut where its ``[Reactions: …]`` tag goes: the bytes before and after it,
    and whether the tag follows the marker (``" [Reactions: …]"``, form 1) or opens
    the text (``"[Reactions: …] "``, form 2)."""

    before: bytes
    after: bytes
    form: int

    def render(self, summary: str) -> bytes:
        if not summary:
            return self.before + self.after
        tag = f" [Reactions: {summary}]" if self.form == 1 else f"[Reactions: {summary}] "
        return self.before + tag.encode() + self.after


def tag_slot(
    row: bytes,
    identity: str,
    with_tag: Callable[[str], Callable[[Entry, str], Entry]],
    max_bytes: int,
) -> TagSlot:
    """Where the reactions tag of ``row`` goes, found by rendering it with a random
    placeholder summary (``with_tag`` is the ``reactions_transform``) and cutting there."""
    entry: Entry = orjson.loads(row)
    for _attempt in range(4):
        placeholder = f"\ue000{secrets.token_hex(8)}\ue000"
        marked = encode(with_tag(placeholder)(entry, identity), max_bytes + 64)
        needle = placeholder.encode()
        if marked.count(needle) != 1:
            continue  # the text happens to hold it (never, in practice): another one
        after_marker = f" [Reactions: {placeholder}]".encode()
        at_start = f"[Reactions: {placeholder}] ".encode()
        at = marked.find(after_marker)
        if at >= 0:
            return TagSlot(marked[:at], marked[at + len(after_marker) :], 1)
        at = marked.find(at_start)
        if at >= 0:
            return TagSlot(marked[:at], marked[at + len(at_start) :], 2)
    raise InvalidMessage("the entry's text leaves no place for a reactions tag", field="content")
