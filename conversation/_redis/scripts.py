"""The Lua scripts: loaded from ``lua/``, called as Redis Functions or by SHA.

Room scripts share the ``_lib.lua`` prelude and session scripts the
``session_lib.lua`` one; each family is a ``ScriptSet``. Every script is built
in two forms from the same files:

* a Redis Function library per family (``FUNCTION LOAD``, ``FCALL``), for
  servers that have functions (Redis 7+, Valkey): the prelude is defined once,
  when the library loads, and each script is a function that binds its call's
  KEYS and ARGV (``bind()`` in the prelude) and runs its body;
* per script, the prelude plus ``bind(KEYS, ARGV)`` plus its body, for
  ``EVALSHA`` (servers without functions, or ``CONVERSATION_FUNCTIONS=0``).

The library and its functions are named with a hash of the library's code
(``conversation_<sha8>``, ``sync_<sha8>``), so two engine versions run side by
side during a rolling deploy. The pipeliner loads a family whole the first time
a server answers that a function or script is missing (the only reload path).
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
#: Functions that never write: flagged ``no-writes``, so they also run while the
#: server is over ``maxmemory`` (as a script that writes nothing does under EVAL).
READ_ONLY_SCRIPT_NAMES = frozenset({"sync", "changes"})

# Names a library's hash in its code before the hash is known.
_HASH = "{sha8}"

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str  # the EVALSHA form: prelude, bind, body
    sha: str
    function: str  # its function in the family's library: <name>_<sha8>


class ScriptSet(Mapping[str, Script]):
    """A family of scripts, by name, loaded together: ``library`` is the code of
    its Redis Function library (``FUNCTION LOAD``), ``library_name`` its name."""

    def __init__(self, scripts: dict[str, Script], library: str, library_name: str) -> None:
        self._scripts = scripts
        self.library = library
        self.library_name = library_name

    def __getitem__(self, name: str) -> Script:
        return self._scripts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scripts)

    def __len__(self) -> int:
        return len(self._scripts)


def _read(name: str) -> str:
    return (data_dir("lua") / f"{name}.lua").read_text(encoding="utf-8")


def _build(
    family: str, prelude_name: str, names: tuple[str, ...], standalone: tuple[str, ...]
) -> ScriptSet:
    prelude = _read(prelude_name)
    bodies = {name: _read(name) for name in (*names, *standalone)}
    # EVALSHA form: the globals KEYS and ARGV are taken before the prelude's locals
    # of the same names hide them.
    head = "local EVAL_KEYS, EVAL_ARGV = KEYS, ARGV\n"
    eval_sources = {
        name: f"{head}{prelude}\nbind(EVAL_KEYS, EVAL_ARGV)\n{bodies[name]}" for name in names
    }
    eval_sources.update((name, bodies[name]) for name in standalone)
    # Library form: the scripts without prelude come first, so that they see the
    # globals and not the prelude's locals (unpack, KEYS, ARGV...).
    parts = [f"#!lua name={family}_{_HASH}\n"]
    for name in (*standalone, None, *names):
        if name is None:
            parts.append(prelude)
            continue
        enter = "bind(keys, args)" if name in names else "local KEYS, ARGV = keys, args"
        flags = "{'no-writes'}" if name in READ_ONLY_SCRIPT_NAMES else "{}"
        parts.append(
            f"\nredis.register_function{{function_name = '{name}_{_HASH}', flags = {flags},"
            f"\n  callback = function(keys, args)\n{enter}\n{bodies[name]}\nend}}\n"
        )
    template = "".join(parts)
    sha8 = hashlib.sha1(template.encode("utf-8")).hexdigest()[:8]
    scripts = {
        name: Script(
            name,
            source,
            hashlib.sha1(source.encode("utf-8")).hexdigest(),
            f"{name}_{sha8}",
        )
        for name, source in eval_sources.items()
    }
    return ScriptSet(scripts, template.replace(_HASH, sha8), f"{family}_{sha8}")


def load_scripts() -> ScriptSet:
    """The room scripts (and the lease and cursor scripts, which need no prelude)."""
    return _build("conversation", "_lib", ROOM_SCRIPT_NAMES, STANDALONE_SCRIPT_NAMES)


def load_session_scripts() -> ScriptSet:
    return _build(
        "conversation_sessions",
        "session_lib",
        SESSION_SCRIPT_NAMES,
        STANDALONE_SESSION_SCRIPT_NAMES,
    )
