"""PromptRenderer: packaged prompts, the sandbox, overrides, errors, undefined names."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError

from conversation._errors import ConfigurationError, TemplateError
from conversation._renderer import PromptRenderer, describe_time, now_in

PACKAGED = ("inference", "agents", "consolidation")
LOGGER = "conversation._renderer"

ROOM: dict[str, Any] = {
    "bot_name": "Sable",
    "room_id": "discord:4242",
    "room_name": "#launch-planning",
    "platform": "discord",
    "sender": "Alice",
    "participants": ["Alice", "Bob", "Carol"],
    "tools": [
        {"name": "web_search", "description": "Search the web and return the top results."},
        {
            "type": "function",
            "function": {"name": "create_ticket", "description": "Open a ticket."},
        },
    ],
    "timezone": "Europe/Paris",
    "now": "2024-03-05T13:03:00+00:00",
    "summary": "**Commitments**\n- Bob will send the budget to Alice by 8 March.",
    "persona": "Dry humour, never sarcastic.",
    "instructions": "Never discuss pricing; point people to sales@example.com.",
}

# Each reaches for Python internals or tries to exhaust memory.
TEMPLATE_PAYLOADS = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "class": "{{ ''.__class__ }}",
    "cycler_globals": "{{ cycler.__init__.__globals__ }}",
    "global_function_globals": "{{ now_in.__globals__['os'] }}",
    "subscript_globals": "{{ now_in['__globals__'] }}",
    "attr_filter": "{{ ''|attr('__class__') }}",
    "format_field": "{{ '{0.__class__.__mro__}'.format('') }}",
    "mutation": "{% set items = [1] %}{{ items.append(2) }}",
    "range": "{% for i in range(10**9) %}{% endfor %}",
    "repeat": "{{ 'a' * 10**9 }}",
    "power": "{{ 2 ** (10**9) }}",
    "ljust": "{{ 'a'.ljust(10**9) }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "percent_width": "{{ '%999999999d' % 1 }}",
    "concat_doubling": (
        "{% set ns = namespace(s='0123456789') %}"
        "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "plus_doubling": (
        "{% set ns = namespace(s='0123456789') %}"
        "{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
    ),
    "join_separator": "{{ range(10000) | join('a' * 500000) }}",
    "center_filter": "{{ 'a' | center(10**9) }}",
    "huge_output": "{% for i in range(10000) %}{{ 'a' * 1000 }}{% endfor %}",
}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "prompts"
    folder.mkdir()
    return folder


# -- packaged templates ---------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("template", PACKAGED)
def test_packaged_template_renders_a_full_room(template: str, strict: bool) -> None:
    prompt = PromptRenderer(template, strict_undefined=strict).render(ROOM)

    assert len(prompt) > 1000
    for fact in ("Sable", "#launch-planning", "Alice, Bob, Carol", "[Message ID: 1234]"):
        assert fact in prompt
    # 13:03 UTC is 14:03 in Paris in March.
    assert "Tuesday 05 March 2024, 14:03 (Europe/Paris, UTC+01:00)" in prompt
    assert "sales@example.com" in prompt
    assert "{{" not in prompt and "{%" not in prompt


@pytest.mark.parametrize("template", ["inference", "agents"])
def test_reply_templates_list_tools_and_platform_advice(template: str) -> None:
    prompt = PromptRenderer(template).render(ROOM)

    assert "`web_search`: Search the web" in prompt
    assert "`create_ticket`: Open a ticket." in prompt
    assert "2000 characters" in prompt  # the Discord advice


def test_consolidation_folds_the_current_summary() -> None:
    prompt = PromptRenderer("consolidation").render(ROOM)

    assert "Bob will send the budget to Alice by 8 March." in prompt
    assert "At most 350 words" in prompt
    assert "Never write a marker in its bracketed form" in prompt
    first = PromptRenderer("consolidation").render({"max_summary_words": 120})
    assert "There is no summary yet" in first
    assert "At most 120 words" in first


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("template", PACKAGED)
def test_packaged_template_renders_without_context_silently(
    template: str, strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    prompt = PromptRenderer(template, strict_undefined=strict).render()

    assert len(prompt) > 500
    assert "Current time: " in prompt
    assert caplog.records == []


def test_agents_without_tools_says_it_cannot_act() -> None:
    assert "You have no tools right now" in PromptRenderer("agents").render()
    assert "You have no tools right now" not in PromptRenderer("agents").render(ROOM)


def test_none_values_render_as_absent() -> None:
    prompt = PromptRenderer().render({"bot_name": None, "room_name": None, "tools": None})

    assert "None" not in prompt
    assert prompt.startswith("You are an AI assistant")


def test_output_has_no_runs_of_blank_lines() -> None:
    prompt = PromptRenderer().render({"persona": "one\n\n\n\n\ntwo"})

    assert "\n\n\n" not in prompt
    assert prompt == prompt.strip()


def test_template_name_accepts_the_suffix() -> None:
    assert PromptRenderer("agents").template_name == "agents.j2"
    assert PromptRenderer("agents.j2").template_name == "agents.j2"
    assert PromptRenderer().template_name == "inference.j2"


# -- the sandbox ---------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATE_PAYLOADS)
def test_template_payload_is_refused_naming_the_template(name: str, user_dir: Path) -> None:
    write(user_dir, f"{name}.j2", "A harmless first line.\n" + TEMPLATE_PAYLOADS[name])
    renderer = PromptRenderer(name, template_dirs=[user_dir])

    with pytest.raises(TemplateError) as info:
        renderer.render(ROOM)

    err = info.value
    assert err.template == f"{name}.j2"
    assert f"'{name}.j2'" in str(err)
    assert isinstance(err.__cause__, SecurityError)
    if name != "huge_output":  # caught while joining the output, after the template ran
        assert err.lineno == 2
        assert "line 2" in str(err)


@pytest.mark.parametrize("payload", [*TEMPLATE_PAYLOADS.values(), "{{ 7*7 }}", "{% raw %}x"])
def test_payload_in_a_value_renders_literally(payload: str) -> None:
    context = {**ROOM, "sender": payload, "persona": payload, "participants": [payload]}

    prompt = PromptRenderer().render(context)

    assert f"Persona\n{payload.strip()}" in prompt
    assert f"The latest message is from {payload}." in prompt


def test_jinja_in_a_value_is_data() -> None:
    # A fixed clock: the rendered time must not happen to contain "49" itself.
    context = {"persona": "I am {{ 7*7 }} years old", "now": "2026-01-01T10:00:00+00:00"}
    prompt = PromptRenderer().render(context)

    assert "I am {{ 7*7 }} years old" in prompt
    assert "49" not in prompt


def test_context_objects_stay_sandboxed(user_dir: Path) -> None:
    write(user_dir, "probe.j2", "{{ hook.__globals__ }}")
    renderer = PromptRenderer("probe", template_dirs=[user_dir])

    with pytest.raises(TemplateError, match="unsafe"):
        renderer.render({"hook": write})


def test_ordinary_arithmetic_and_formatting_still_work(user_dir: Path) -> None:
    write(
        user_dir,
        "ok.j2",
        "{{ 7*7 }}|{{ '-' * 5 }}|{{ 2 ** 10 }}|{{ '%3d' % 7 }}|{{ '{:>4}'.format('a') }}"
        "|{{ range(3) | join(',') }}|{{ 'a' ~ 'b' }}|{{ [1] + [2] }}|{{ 'x' | center(5) }}|",
    )

    out = PromptRenderer("ok", template_dirs=[user_dir]).render()

    assert out == "49|-----|1024|  7|   a|0,1,2|ab|[1, 2]|  x  |"


# -- user folders --------------------------------------------------------------------


def test_user_partial_overrides_one_file_and_inherits_the_rest(user_dir: Path) -> None:
    write(user_dir, "_room.j2", "## Room\nWe are in {{ room_name }}, a private channel.\n\n")

    prompt = PromptRenderer("inference", template_dirs=[user_dir]).render(ROOM)

    assert "We are in #launch-planning, a private channel." in prompt
    assert "## Where you are" not in prompt
    assert "## Message markers" in prompt  # packaged partial, untouched
    assert "`web_search`" in prompt


def test_user_template_overrides_and_includes_packaged_partials(user_dir: Path) -> None:
    write(
        user_dir, "inference.j2", "You are {{ bot_name }}, a pirate.\n\n{% include '_markers.j2' %}"
    )

    prompt = PromptRenderer(template_dirs=[str(user_dir)]).render(ROOM)

    assert prompt.startswith("You are Sable, a pirate.")
    assert "## Message markers" in prompt


def test_user_template_extends_the_packaged_one(user_dir: Path) -> None:
    write(
        user_dir,
        "inference.j2",
        '{% extends "packaged/inference.j2" %}\n'
        "{% block guidelines %}\n## How to reply\n- Answer in rhyme.\n{% endblock %}\n",
    )

    prompt = PromptRenderer(template_dirs=[user_dir]).render(ROOM)

    assert "- Answer in rhyme." in prompt
    assert "Write a chat message, not an essay" not in prompt
    assert "## Where you are" in prompt


def test_earlier_user_folder_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write(first, "custom.j2", "from a")
    write(second, "custom.j2", "from b")

    assert PromptRenderer("custom", template_dirs=[first, second]).render() == "from a"


def test_a_lone_path_is_one_folder(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "hello")

    assert PromptRenderer("custom", template_dirs=str(user_dir)).render() == "hello"


def test_a_folder_that_does_not_exist_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a directory"):
        PromptRenderer(template_dirs=[tmp_path / "nope"])


# -- errors --------------------------------------------------------------------------


def test_syntax_error_names_file_and_line_at_construction(user_dir: Path) -> None:
    path = write(user_dir, "broken.j2", "line one\nline two {{ name }\n")

    with pytest.raises(TemplateError) as info:
        PromptRenderer("broken", template_dirs=[user_dir])

    err = info.value
    assert (err.template, err.lineno) == ("broken.j2", 2)
    assert "'broken.j2' line 2" in str(err)
    assert str(path) in str(err)
    assert isinstance(err.__cause__, TemplateSyntaxError)


def test_syntax_error_in_an_overridden_partial_names_the_partial(user_dir: Path) -> None:
    write(user_dir, "_markers.j2", "ok\n\n{% if %}\n")

    with pytest.raises(TemplateError) as info:
        PromptRenderer("agents", template_dirs=[user_dir])

    assert (info.value.template, info.value.lineno) == ("_markers.j2", 3)


def test_runtime_error_in_a_partial_names_the_partial(user_dir: Path) -> None:
    write(user_dir, "_tools.j2", "tools:\n{{ tools | first | int + none }}\n")
    renderer = PromptRenderer("inference", template_dirs=[user_dir])

    with pytest.raises(TemplateError) as info:
        renderer.render(ROOM)

    assert (info.value.template, info.value.lineno) == ("_tools.j2", 2)
    assert isinstance(info.value.__cause__, TypeError)


def test_missing_template_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match=r"'nope\.j2' not found") as info:
        PromptRenderer("nope")

    assert info.value.template == "nope.j2"


def test_missing_include_names_the_including_line(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "hello\n{% include '_absent.j2' %}\n")

    with pytest.raises(TemplateError, match=r"_absent\.j2") as info:
        PromptRenderer("custom", template_dirs=[user_dir])

    assert (info.value.template, info.value.lineno) == ("custom.j2", 2)


# -- undefined variables -------------------------------------------------------------


def test_undefined_is_lenient_and_warns_once_per_template_and_name(
    user_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(user_dir, "_room.j2", "Topic: {{ topic }}.{% for t in tags %}{{ t }}{% endfor %}\n\n")
    write(user_dir, "custom.j2", "Hi {{ topic }}{{ user.name }}.\n{% include '_room.j2' %}")
    renderer = PromptRenderer("custom", template_dirs=[user_dir])
    caplog.set_level(logging.WARNING, logger=LOGGER)

    first = renderer.render()
    second = renderer.render()

    assert first == second == "Hi .\nTopic: ."
    warned = sorted((r.args[0], r.args[1]) for r in caplog.records if isinstance(r.args, tuple))
    assert warned == [
        ("_room.j2", "tags"),
        ("_room.j2", "topic"),
        ("custom.j2", "topic"),
        ("custom.j2", "user"),
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_undefined_warning_never_logs_values(
    user_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(user_dir, "custom.j2", "{{ sender.display_name }}")
    caplog.set_level(logging.WARNING, logger=LOGGER)

    out = PromptRenderer("custom", template_dirs=[user_dir]).render({"sender": "s3cret-name"})

    assert out == ""
    assert len(caplog.records) == 1
    assert "display_name" in caplog.records[0].getMessage()
    assert "s3cret" not in caplog.text


def test_strict_undefined_raises_naming_the_line(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "fine\n{{ topic }}\n")
    renderer = PromptRenderer("custom", template_dirs=[user_dir], strict_undefined=True)

    with pytest.raises(TemplateError, match="'topic' is undefined") as info:
        renderer.render()

    assert (info.value.template, info.value.lineno) == ("custom.j2", 2)
    assert isinstance(info.value.__cause__, UndefinedError)
    assert renderer.render({"topic": "launch"}) == "fine\nlaunch"


def test_defined_test_and_default_filter_work_in_strict_mode(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "{{ a | default('x') }}{% if b is defined %}b{% endif %}")

    assert PromptRenderer("custom", template_dirs=[user_dir], strict_undefined=True).render() == "x"


# -- async, globals, filters, reload --------------------------------------------------


async def test_render_async_matches_render_and_stays_on_the_loop(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "{{ bot_name }} {{ on_main() }}")
    main = threading.get_ident()
    renderer = PromptRenderer(
        "custom",
        template_dirs=[user_dir],
        globals={"on_main": lambda: threading.get_ident() == main},
    )

    assert await renderer.render_async({"bot_name": "Sable"}) == "Sable True"
    assert await PromptRenderer().render_async(ROOM) == PromptRenderer().render(ROOM)


async def test_render_async_with_auto_reload_runs_in_a_worker_thread(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "{{ on_main() }}")
    main = threading.get_ident()
    renderer = PromptRenderer(
        "custom",
        template_dirs=[user_dir],
        globals={"on_main": lambda: threading.get_ident() == main},
        auto_reload=True,
    )

    assert await renderer.render_async() == "False"


async def test_render_async_raises_template_error(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "{{ ''.__class__ }}")
    renderer = PromptRenderer("custom", template_dirs=[user_dir])

    with pytest.raises(TemplateError, match=r"custom\.j2"):
        await renderer.render_async()


def test_user_globals_and_filters(user_dir: Path) -> None:
    write(user_dir, "custom.j2", "{{ greeting }}, {{ sender | shout }}! {{ count_words(persona) }}")
    shout: Callable[[str], str] = lambda s: s.upper() + "!"  # noqa: E731
    renderer = PromptRenderer(
        "custom",
        template_dirs=[user_dir],
        globals={"greeting": "Hello", "count_words": lambda s: len(s.split())},
        filters={"shout": shout},
    )

    assert renderer.render({"sender": "alice", "persona": "a b c"}) == "Hello, ALICE!! 3"


def _bump_mtime(path: Path) -> None:
    # Set the modification time explicitly rather than waiting for the clock
    # to tick past the file system's timestamp resolution.
    stamp = path.stat().st_mtime + 10
    os.utime(path, (stamp, stamp))


@pytest.mark.parametrize("auto_reload", [False, True])
def test_auto_reload_picks_up_a_changed_file(user_dir: Path, auto_reload: bool) -> None:
    path = write(user_dir, "custom.j2", "version one")
    renderer = PromptRenderer("custom", template_dirs=[user_dir], auto_reload=auto_reload)
    assert renderer.render() == "version one"

    write(user_dir, "custom.j2", "version two")
    _bump_mtime(path)

    assert renderer.render() == ("version two" if auto_reload else "version one")


# -- time helpers --------------------------------------------------------------------


def test_now_in_converts_iso_datetime_and_epoch() -> None:
    import datetime as dt

    paris = now_in("Europe/Paris", "2024-07-01T12:00:00Z")
    assert paris.isoformat() == "2024-07-01T14:00:00+02:00"
    naive = now_in("America/New_York", dt.datetime(2024, 1, 1, 17, 0))
    assert naive.isoformat() == "2024-01-01T12:00:00-05:00"
    assert now_in(None, 0).isoformat() == "1970-01-01T00:00:00+00:00"
    assert describe_time(paris) == "Monday 01 July 2024, 14:00 (Europe/Paris, UTC+02:00)"


def test_unknown_timezone_falls_back_to_utc_without_logging_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)

    prompt = PromptRenderer().render({"timezone": "Mars/Olympus_Mons", "now": "2024-03-05T13:03Z"})

    assert "Tuesday 05 March 2024, 13:03 (UTC, UTC+00:00)" in prompt
    assert "unknown timezone" in caplog.text
    assert "Olympus" not in caplog.text


def test_bad_now_value_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match=r"_room\.j2"):
        PromptRenderer().render({"now": "yesterday-ish"})
