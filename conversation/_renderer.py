"""Render system prompts from sandboxed Jinja templates.

Templates live in ``prompt_templates/`` (packaged) and in any folders the user
passes as ``template_dirs``, which are searched first, file by file: a user
folder holding only ``_room.j2`` changes the room facts of every packaged
prompt and inherits the rest. The packaged copies also stay reachable under
the ``packaged/`` prefix, so a user template can ``{% extends
"packaged/inference.j2" %}`` and override single blocks.

Safety. Templates run in Jinja's ``ImmutableSandboxedEnvironment``: no
attribute starting with ``_``, no known-unsafe internals, no mutation of lists
or dicts. Reaching for an unsafe attribute raises at once instead of rendering
empty, so a probe such as ``{{ ''.__class__ }}`` is a loud error. Values of
``room_context`` are data: they are printed, never compiled, so ``{{ 7*7 }}``
in a user's display name renders as those eight characters.

Resource limits. The sandbox also refuses the usual amplifiers: ``range``
beyond :data:`MAX_RANGE` items; ``*``, ``+``, ``~``, ``**`` and ``%`` whose
result would exceed :data:`MAX_SIZE` items (or :data:`MAX_INT_BITS` bits);
width, padding and repetition arguments of string methods and filters beyond
:data:`MAX_SIZE`; and a rendered prompt longer than :data:`MAX_SIZE`
characters. This stops accidents and the obvious payloads. It is not a
resource jail: a template can still spend CPU in nested loops, so folders of
templates should be writable only by whoever deploys the bot.

Undefined variables. Lenient by default: an undefined name renders as an
empty string, iterates as empty and is falsy, and the first such use of each
(template, name) pair logs one WARNING naming both, never a value. Attribute
chains on an undefined value stay undefined (``{{ user.name }}``).
Arithmetic on, or calling, an undefined value still fails. With
``strict_undefined=True`` any use other than ``is defined`` and the
``default`` filter raises. Packaged templates only use those two forms, so
they render in both modes with any subset of their context variables.

Every failure surfaces as :class:`~conversation.TemplateError` naming the
template file and line, chained to the Jinja exception.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import string
import sys
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio.to_thread
import jinja2
from jinja2 import filters as jinja_filters
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from conversation._errors import ConfigurationError, TemplateError
from conversation._resources import data_dir

__all__ = ["MAX_INT_BITS", "MAX_RANGE", "MAX_SIZE", "PromptRenderer", "describe_time", "now_in"]

logger = logging.getLogger(__name__)

#: Largest ``range()`` a template may build.
MAX_RANGE = 10_000
#: Largest string or sequence an operator, filter or method may build, the
#: largest width or padding it may ask for, and the longest rendered prompt.
MAX_SIZE = 1_000_000
#: Largest integer (in bits) ``*`` and ``**`` may produce.
MAX_INT_BITS = 4_096

_TEMPLATE_SUFFIX = ".j2"
_PACKAGED_PREFIX = "packaged"
# Runs of blank or whitespace-only lines. (A plain ``\n{3,}`` is several
# times slower on CPython's engine and was most of a warm render's cost.)
_BLANK_RUNS = re.compile(r"\n(?:[ \t]*\n){2,}")
# One printf conversion; ``%%`` is matched first so it is never read as a spec.
_PERCENT_SPEC = re.compile(r"%%|%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


def _refuse(message: str) -> NoReturn:
    raise SecurityError(message)


def _check_size(size: int, what: str) -> None:
    if size > MAX_SIZE:
        _refuse(f"{what} would build {size} items, more than the limit of {MAX_SIZE}")


def _check_width(width: object, what: str) -> None:
    if isinstance(width, int):
        _check_size(width, what)


def _check_percent_format(fmt: str) -> None:
    for match in _PERCENT_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                _refuse("'*' widths are not allowed in %-formatting in templates")
            if number is not None:
                _check_size(int(number), "a %-format width")


def _check_brace_format(fmt: str) -> None:
    for _literal, _field, spec, _conversion in string.Formatter().parse(fmt):
        if not spec:
            continue
        if "{" in spec:
            _refuse("nested fields in format specs are not allowed in templates")
        for number in _DIGITS.findall(spec):
            _check_size(int(number), "a format width")


def _check_repeat(seq: object, times: object) -> None:
    if isinstance(times, int) and isinstance(seq, Sized):
        _check_size(len(seq) * times, "repetition")


def _check_replace(text: str, old: str, new: str, count: int | None) -> None:
    hits = len(text) + 1 if not old else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    _check_size(len(text) + hits * (len(new) - len(old)), "replace")


def _sized(value: object) -> bool:
    return isinstance(value, str | bytes | list | tuple)


class _BoundedCodeGenerator(CodeGenerator):
    """Routes ``~`` through the environment so its result size is checked first."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            # Markup joining has escaping rules of its own: keep it and check
            # the result afterwards (prompts rarely turn autoescape on).
            self.write("environment.checked_length(")
            super().visit_Concat(node, frame)
            self.write(")")
            return
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _SandboxedEnvironment(ImmutableSandboxedEnvironment):
    """The Jinja sandbox with resource limits and loud security errors."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                bits = left.bit_length() + right.bit_length()
                if bits > MAX_INT_BITS:
                    _refuse(f"'*' would build a {bits}-bit integer (limit {MAX_INT_BITS})")
            _check_repeat(left, right)
            _check_repeat(right, left)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0:
                bits = abs(left).bit_length() * right
                if bits > MAX_INT_BITS:
                    _refuse(f"'**' would build a {bits}-bit integer (limit {MAX_INT_BITS})")
        elif operator == "+":
            if _sized(left) and _sized(right):
                _check_size(len(left) + len(right), "'+'")
        elif isinstance(left, str):
            _check_percent_format(left)
        return super().call_binop(context, operator, left, right)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja's default hands back an Undefined that renders empty until it
        # is used further; a probe for internals should fail loudly instead.
        _refuse(f"access to attribute {attribute!r} of a {type(obj).__name__!r} is unsafe")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_brace_format(value.__self__)
        return wrapped

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, types.BuiltinMethodType) and isinstance(owner, str | bytes):
            args = _check_string_method(owner, obj.__name__, args)
        elif (
            isinstance(obj, types.BuiltinMethodType)
            and isinstance(owner, int)
            and obj.__name__ == "to_bytes"
        ):
            _check_width(args[0] if args else kwargs.get("length"), "int.to_bytes")
        return super().call(context, obj, *args, **kwargs)

    def bounded_join(self, values: Iterable[Any]) -> str:
        parts = [str(value) for value in values]
        _check_size(sum(map(len, parts)), "'~'")
        return "".join(parts)

    def checked_length(self, text: str) -> str:
        _check_size(len(text), "'~'")
        return text


def _check_string_method(owner: str | bytes, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if name in _WIDTH_METHODS and args:
        _check_width(args[0], f"str.{name}")
    elif name == "expandtabs":
        tabsize = args[0] if args and isinstance(args[0], int) else 8
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        _check_size(len(owner) + tabs * tabsize, "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(owner, str):
        count = args[2] if len(args) > 2 and isinstance(args[2], int) else None
        _check_replace(owner, str(args[0]), str(args[1]), count)
    elif name == "join" and args:
        # Materialised once so the size is known before the join allocates.
        items = list(args[0])
        total = len(owner) * max(len(items) - 1, 0)
        total += sum(len(item) for item in items if _sized(item))
        _check_size(total, "str.join")
        return (items, *args[1:])
    elif name in {"translate", "maketrans"}:
        _refuse(f"str.{name} is not available in templates")
    return args


def _bounded_range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        _refuse(f"range() of {len(rng)} items is over the limit of {MAX_RANGE}")
    return rng


def _center_filter(value: str, width: int = 80) -> str:
    _check_width(width, "the center filter")
    return jinja_filters.do_center(value, width)


def _indent_filter(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    prefix = width if isinstance(width, int) else len(width)
    _check_size(len(s) + (s.count("\n") + 1) * prefix, "the indent filter")
    return jinja_filters.do_indent(s, width, first, blank)


@jinja2.pass_eval_context
def _replace_filter(
    eval_ctx: jinja2.nodes.EvalContext, s: str, old: str, new: str, count: int | None = None
) -> str:
    _check_replace(str(s), str(old), str(new), count)
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _join_filter(
    eval_ctx: jinja2.nodes.EvalContext,
    value: Iterable[Any],
    d: str = "",
    attribute: str | int | None = None,
) -> str:
    items = list(value)
    if attribute is not None:
        items = list(map(jinja_filters.make_attrgetter(eval_ctx.environment, attribute), items))
    total = len(d) * max(len(items) - 1, 0) + sum(len(str(item)) for item in items)
    _check_size(total, "the join filter")
    result: str = jinja_filters.sync_do_join(eval_ctx, items, d)
    return result


def _format_filter(value: str, *args: Any, **kwargs: Any) -> str:
    _check_percent_format(str(value))
    return jinja_filters.do_format(value, *args, **kwargs)


def _batch_filter(
    value: Iterable[Any], linecount: int, fill_with: Any = None
) -> Iterator[list[Any]]:
    if fill_with is not None:
        _check_width(linecount, "the batch filter")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice_filter(
    value: Collection[Any], slices: int, fill_with: Any = None
) -> Iterator[list[Any]]:
    if isinstance(slices, int) and slices > MAX_RANGE:
        _refuse(f"slice into {slices} lists is over the limit of {MAX_RANGE}")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "batch": _batch_filter,
    "center": _center_filter,
    "format": _format_filter,
    "indent": _indent_filter,
    "join": _join_filter,
    "replace": _replace_filter,
    "slice": _slice_filter,
}


def _to_zone(tz: object) -> dt.tzinfo:
    if isinstance(tz, dt.tzinfo):
        return tz
    if isinstance(tz, str) and tz:
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            # The zone usually comes from a user's profile; a bad one should
            # not cost the room its prompt. The value itself is not logged.
            logger.warning("unknown timezone in the room context; using UTC")
    return dt.UTC


def now_in(tz: object = None, at: object = None) -> dt.datetime:
    """The time ``at`` (an ISO string, datetime or epoch seconds; default now) in zone ``tz``.

    ``tz`` is an IANA name such as ``"Europe/Paris"``; missing or unknown means
    UTC. A naive ``at`` is read as UTC. Exposed to templates as ``now_in``.
    """
    if at is None or isinstance(at, jinja2.Undefined):
        moment = dt.datetime.now(dt.UTC)
    elif isinstance(at, dt.datetime):
        moment = at
    elif isinstance(at, int | float):
        moment = dt.datetime.fromtimestamp(at, dt.UTC)
    elif isinstance(at, str):
        moment = dt.datetime.fromisoformat(at)
    else:
        raise TypeError(f"cannot read a time from a {type(at).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(_to_zone(tz))


def describe_time(moment: dt.datetime) -> str:
    """``Tuesday 05 March 2024, 14:03 (Europe/Paris, UTC+01:00)``, for a model to read."""
    zone = getattr(moment.tzinfo, "key", None) or moment.tzname() or "UTC"
    offset = moment.utcoffset() or dt.timedelta(0)
    sign = "-" if offset < dt.timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return (
        f"{moment.strftime('%A %d %B %Y, %H:%M')} "
        f"({zone}, UTC{sign}{minutes // 60:02d}:{minutes % 60:02d})"
    )


def _calling_template(default: str) -> str:
    # Compiled templates run with a module namespace that names the template,
    # so the innermost one on the stack is where the undefined name was used.
    frame: types.FrameType | None = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("name")
        if isinstance(name, str) and "__jinja_template__" in frame.f_globals:
            return name
        frame = frame.f_back
    return default


def _lenient_undefined(template: str, warned: set[tuple[str, str]]) -> type[jinja2.Undefined]:
    class LenientUndefined(jinja2.ChainableUndefined):
        __slots__ = ()

        def _warn(self) -> None:
            name = self._undefined_name
            if name is None:
                return
            key = (_calling_template(template), name)
            if key in warned:
                return
            warned.add(key)
            if self._undefined_obj is jinja2.utils.missing:
                logger.warning(
                    "prompt template %r uses undefined variable %r; it renders empty", *key
                )
            else:
                logger.warning(
                    "prompt template %r reads missing attribute %r of a %s; it renders empty",
                    key[0],
                    name,
                    type(self._undefined_obj).__name__,
                )

        def __str__(self) -> str:
            self._warn()
            return ""

        def __iter__(self) -> Iterator[Any]:
            self._warn()
            return iter(())

        def __bool__(self) -> bool:
            self._warn()
            return False

        def __len__(self) -> int:
            self._warn()
            return 0

    return LenientUndefined


def _finalize(value: Any) -> Any:
    # A context value explicitly set to None means "not known", not "None".
    return "" if value is None else value


def _resolve_name(template: str) -> str:
    return template if Path(template).suffix else template + _TEMPLATE_SUFFIX


class PromptRenderer:
    """Renders one prompt template (``inference``, ``agents``, ``consolidation``, …).

    ``template`` names a file of the template folders; without a suffix it
    means ``<template>.j2``. ``template_dirs`` are searched before the packaged
    ``prompt_templates/``, so a file there overrides the packaged file of the
    same name for every template that includes it. ``globals`` and
    ``filters`` are added to the environment (``now_in`` and
    ``describe_time`` are provided). Compiled templates are cached;
    ``auto_reload=True`` re-reads a file when its modification time changes.

    The template and every partial it names literally are loaded at
    construction, so a missing file or a syntax error fails at start-up with
    :class:`~conversation.TemplateError` rather than on the first message.

    Output is stripped and runs of blank lines collapse into one, so optional
    sections can be left out without leaving gaps.
    """

    def __init__(
        self,
        template: str = "inference",
        *,
        template_dirs: Sequence[str | os.PathLike[str]] = (),
        globals: Mapping[str, Any] | None = None,
        filters: Mapping[str, Callable[..., Any]] | None = None,
        strict_undefined: bool = False,
        auto_reload: bool = False,
    ) -> None:
        if not isinstance(template, str) or not template.strip():
            raise ConfigurationError("template must be a non-empty template name")
        if isinstance(template_dirs, str | os.PathLike):
            # A lone path is a common slip; a str would otherwise be read as
            # a sequence of one-character folders.
            template_dirs = [template_dirs]
        user_dirs = [Path(d) for d in template_dirs]
        for folder in user_dirs:
            if not folder.is_dir():
                raise ConfigurationError(f"template folder {str(folder)!r} is not a directory")
        try:
            packaged = data_dir("prompt_templates")
        except FileNotFoundError as exc:
            raise ConfigurationError(str(exc)) from exc

        self._template_name = _resolve_name(template)
        self._search_path = [*user_dirs, packaged]
        self._strict = strict_undefined
        self._warned: set[tuple[str, str]] = set()
        undefined = (
            jinja2.StrictUndefined
            if strict_undefined
            else _lenient_undefined(self._template_name, self._warned)
        )
        packaged_loader = jinja2.FileSystemLoader(packaged)
        env = _SandboxedEnvironment(
            loader=jinja2.ChoiceLoader(
                [
                    jinja2.FileSystemLoader(user_dirs),
                    packaged_loader,
                    jinja2.PrefixLoader({_PACKAGED_PREFIX: packaged_loader}),
                ]
            ),
            undefined=undefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            # A partial's final blank line then separates it from what follows.
            keep_trailing_newline=True,
            auto_reload=auto_reload,
            finalize=_finalize,
        )
        # lipsum(n=10**9) would be an easy way to exhaust memory, and prompts
        # have no use for placeholder text.
        env.globals.pop("lipsum", None)
        env.globals["range"] = _bounded_range
        env.globals["now_in"] = now_in
        env.filters.update(_BOUNDED_FILTERS)
        env.filters["describe_time"] = describe_time
        env.globals.update(globals or {})
        env.filters.update(filters or {})
        self._env = env
        self._preload(self._template_name, set())

    @property
    def template_name(self) -> str:
        """The file this renderer renders, e.g. ``inference.j2``."""
        return self._template_name

    @property
    def strict_undefined(self) -> bool:
        return self._strict

    def __repr__(self) -> str:
        return f"PromptRenderer({self._template_name!r}, strict_undefined={self._strict})"

    def render(self, room_context: Mapping[str, Any] | None = None) -> str:
        """Render the prompt for one room; raises :class:`~conversation.TemplateError`."""
        try:
            template = self._env.get_template(self._template_name)
            parts: list[str] = []
            size = 0
            for chunk in template.generate(dict(room_context or {})):
                size += len(chunk)
                if size > MAX_SIZE:
                    _refuse(f"the rendered prompt is longer than {MAX_SIZE} characters")
                parts.append(chunk)
        except TemplateError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        return _BLANK_RUNS.sub("\n\n", "".join(parts)).strip()

    async def render_async(self, room_context: Mapping[str, Any] | None = None) -> str:
        """Render without blocking the event loop.

        Rendering is pure CPU work and fast: a packaged template takes
        0.05-0.2 ms once cached (compiling happens in the constructor), while
        a hop to a worker thread and back alone costs about as much. So this
        renders inline, on the event loop's thread, unless ``auto_reload`` is
        on: then every render stats the template files, blocking file-system
        I/O, and it runs in a worker thread via :func:`anyio.to_thread.run_sync`.
        A custom template doing heavy work can be offloaded the same way by
        the caller.
        """
        if self._env.auto_reload:
            return await anyio.to_thread.run_sync(self.render, room_context)
        return self.render(room_context)

    def _preload(self, name: str, seen: set[str], parent: str | None = None, line: int = 0) -> None:
        """Compile ``name`` and, recursively, every template it names literally."""
        seen.add(name)
        try:
            self._env.get_template(name)
            source, filename, _ = self._env.loader.get_source(self._env, name)  # type: ignore[union-attr]
            tree = self._env.parse(source, name, filename)
        except jinja2.TemplateNotFound as exc:
            if parent is None:
                raise self._error(exc) from exc
            raise TemplateError(
                f"prompt template {parent!r} line {line}: it includes {name!r},"
                f" which is not found in {self._searched()}",
                template=parent,
                lineno=line,
            ) from exc
        except Exception as exc:
            raise self._error(exc) from exc
        references = (nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)
        for node in tree.find_all(references):
            target = getattr(node, "template", None)
            if getattr(node, "ignore_missing", False) or not isinstance(target, nodes.Const):
                continue
            if isinstance(target.value, str) and target.value not in seen:
                self._preload(target.value, seen, name, node.lineno)

    def _searched(self) -> str:
        return ", ".join(str(p) for p in self._search_path)

    def _display_name(self, filename: str) -> str:
        path = Path(filename)
        for root in self._search_path:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return filename

    def _error(self, exc: BaseException) -> TemplateError:
        """Translate a Jinja (or render-time) failure into a TemplateError."""
        name, path, lineno = self._template_name, None, None
        if isinstance(exc, jinja2.TemplateSyntaxError):
            path, lineno = exc.filename, exc.lineno
            name = exc.name or (self._display_name(path) if path else name)
        tb = exc.__traceback__
        while tb is not None:
            # Jinja rewrites template frames into fake ones raising from the
            # template file at the template line; the innermost one is where
            # the failure happened.
            if "__jinja_exception__" in tb.tb_frame.f_globals:
                path = tb.tb_frame.f_code.co_filename
                name, lineno = self._display_name(path), tb.tb_lineno
            tb = tb.tb_next
        if isinstance(exc, jinja2.TemplateNotFound) and lineno is None:
            missing = str(exc.name)
            return TemplateError(
                f"prompt template {missing!r} not found in {self._searched()}", template=missing
            )
        where = f"prompt template {name!r}"
        if lineno is not None:
            where += f" line {lineno}"
        if path is not None and Path(path).is_file():
            where += f" ({path})"
        if isinstance(exc, jinja2.TemplateSyntaxError):
            what = f"syntax error: {exc.message}"
        elif isinstance(exc, jinja2.TemplateNotFound):
            what = f"template {exc.name!r} not found in {self._searched()}"
        elif isinstance(exc, SecurityError):
            what = f"refused by the sandbox: {exc}"
        elif isinstance(exc, jinja2.UndefinedError):
            what = f"undefined value: {exc.message}"
        else:
            what = f"{type(exc).__name__}: {exc}"
        return TemplateError(f"{where}: {what}", template=name, lineno=lineno)
