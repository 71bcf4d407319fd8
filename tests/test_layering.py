"""The package's layers import one way only, and its public face is exactly ``__all__``.

Every import in ``conversation/`` is read from the source (``TYPE_CHECKING``
imports included: a type-only upward import is still an upward dependency), and
each module is placed in a layer by its path. A module may import its own layer
and the layers below it, never one above; and the import graph has no cycle.
docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import conversation

PACKAGE = Path(conversation.__file__).resolve().parent

# Bottom to top. A module belongs to the first layer one of whose prefixes it
# equals or lies under.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        ("_errors", "_stats", "_resources", "_entries", "_budget", "_reactions", "_deferred"),
    ),
    ("redis", ("_redis",)),
    ("engine", ("_engine",)),
    ("services", ("_renderer", "_consolidation", "_sessions", "_changes", "_transfer")),
    ("facade", ("_manager",)),
    ("public", ("__init__", "integrations", "testing", "blocking", "platforms")),
    ("tooling", ("_tools", "__main__")),
)

PUBLIC_FACE = {
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
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index
    raise AssertionError(f"conversation.{module} is in no layer: add it to LAYERS")


def imports_of(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """The package modules ``module`` imports, with the line of each import."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if module != "__init__" else []
    package = here if is_package else here[:-1]
    known = modules()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "conversation":
                stem = node.module.partition(".")[2]
            else:
                continue
            for alias in node.names:
                candidate = f"{stem}.{alias.name}" if stem else alias.name
                targets.append(candidate if candidate in known else stem or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "conversation":
                    targets.append(alias.name.partition(".")[2] or "__init__")
        for target in targets:
            if target in known and target != module:
                yield target, getattr(node, "lineno", 0)


def graph() -> dict[str, set[str]]:
    return {name: {t for t, _ in imports_of(name, path)} for name, path in modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for name, path in modules().items():
        for target, line in imports_of(name, path):
            mine, theirs = LAYERS[layer_of(name)][0], LAYERS[layer_of(target)][0]
            if layer_of(target) > layer_of(name):
                upward.append(
                    f"conversation/{path.relative_to(PACKAGE)}:{line}: "
                    f"{name} ({mine}) imports {target} ({theirs})"
                )
    assert upward == []


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The reader of imports is not vacuous: it finds relative and absolute ones."""
    found = dict(imports_of("_manager", PACKAGE / "_manager.py"))
    assert "_engine.replicator" in found
    assert "_redis.rooms" in found
    assert layer_of("_engine.replicator") < layer_of("_manager")


def test_all_is_exactly_the_public_face() -> None:
    assert set(conversation.__all__) == PUBLIC_FACE
    assert len(conversation.__all__) == len(PUBLIC_FACE)
    for name in conversation.__all__:
        assert getattr(conversation, name) is not None, name
    exposed = {
        name
        for name, value in vars(conversation).items()
        if not name.startswith("_") and not isinstance(value, type(conversation))
    }
    assert exposed - {"annotations"} == PUBLIC_FACE


@pytest.mark.parametrize("layer", ["_redis", "_engine"])
def test_the_inner_layers_have_no_public_names(layer: str) -> None:
    package = PACKAGE / layer / "__init__.py"
    tree = ast.parse(package.read_text(encoding="utf-8"))
    assert [node for node in tree.body if not isinstance(node, ast.Expr)] == []
