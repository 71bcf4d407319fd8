"""The Lua scripts: loaded from ``lua/``, called by SHA, reloaded as one set.

Room scripts share the ``_lib.lua`` prelude and session scripts the
``session_lib.lua`` one; each family is a ``ScriptSet``, which the pipeliner
loads whole the first time a server answers NOSCRIPT (the only reload path).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .._resources import data_dir

ROOM_SCRIPT_NAMES = (
    "sync",
    "append",
    "replace",
    "react",
    "defer",
    "clear",
    "set_limit",
    "rewrite",
    "fold",
    "archive_stage",
    "changes",
    "import",
)
#: Scripts that run without the ``_lib.lua`` prelude: they touch no room window.
STANDALONE_SCRIPT_NAMES = ("lease_release", "lease_renew", "cursor_set")
SESSION_SCRIPT_NAMES = (
    "session_create",
    "session_get",
    "session_append",
    "session_delete",
    "session_list",
    "session_import",
    "session_splice",
)
#: Session scripts without the ``session_lib.lua`` prelude: they touch no session.
STANDALONE_SESSION_SCRIPT_NAMES = ("session_group",)
#: Scripts whose replies ``WAIT`` need not vouch for: they write no room state. (A
#: staged archive part only counts once its fold commits, and the fold's own WAIT
#: covers every write before it: replication is one ordered stream.)
NO_WAIT_SCRIPT_NAMES = frozenset(
    {"sync", "changes", "lease_release", "lease_renew", "archive_stage"}
)

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, prelude: str) -> Script:
        body = (data_dir("lua") / f"{name}.lua").read_text(encoding="utf-8")
        source = f"{prelude}\n{body}"
        return cls(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


class ScriptSet(Mapping[str, Script]):
    """A family of scripts, by name, loaded together."""

    def __init__(self, scripts: dict[str, Script]) -> None:
        self._scripts = scripts

    def __getitem__(self, name: str) -> Script:
        return self._scripts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scripts)

    def __len__(self) -> int:
        return len(self._scripts)


def load_scripts() -> ScriptSet:
    """The room scripts (and the lease scripts, which need no prelude)."""
    prelude = (data_dir("lua") / "_lib.lua").read_text(encoding="utf-8")
    scripts = {name: Script.load(name, prelude) for name in ROOM_SCRIPT_NAMES}
    scripts.update((name, Script.load(name, "")) for name in STANDALONE_SCRIPT_NAMES)
    return ScriptSet(scripts)


def load_session_scripts() -> ScriptSet:
    prelude = (data_dir("lua") / "session_lib.lua").read_text(encoding="utf-8")
    scripts = {name: Script.load(name, prelude) for name in SESSION_SCRIPT_NAMES}
    scripts.update((name, Script.load(name, "")) for name in STANDALONE_SESSION_SCRIPT_NAMES)
    return ScriptSet(scripts)
