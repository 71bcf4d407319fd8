"""The built wheel carries the Lua scripts and prompt templates and finds them installed.

A checkout finds ``lua/`` and ``prompt_templates/`` at the repository root, so
only an installed wheel proves they ship. The wheel goes into a throwaway venv
whose dependencies come from the project venv (nothing is downloaded at
install time), and the checks run with the working directory outside the
repository so the checkout cannot be imported by accident.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import json, sys, sysconfig
from pathlib import Path

import conversation
from conversation._renderer import PromptRenderer
from conversation._resources import data_dir

room = {
    "bot_name": "Sable", "room_name": "#general", "platform": "discord", "sender": "Alice",
    "participants": ["Alice", "Bob"], "timezone": "Europe/Paris",
    "tools": [{"name": "web_search", "description": "Search the web."}],
}
templates = data_dir("prompt_templates")
try:
    lua = str(data_dir("lua"))
except FileNotFoundError:
    lua = None
print(json.dumps({
    "site": sysconfig.get_paths()["purelib"],
    "package": conversation.__file__,
    "lua": lua,
    "lua_files": sorted(p.name for p in Path(lua).glob("*.lua")) if lua else [],
    "templates": str(templates),
    "template_files": sorted(p.name for p in templates.glob("*.j2")),
    "rendered": {
        name: PromptRenderer(name).render(room)
        for name in ("inference", "agents", "consolidation")
    },
}))
"""


def run(*cmd: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    proc = subprocess.run(
        [str(c) for c in cmd],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def build_wheel(outdir: Path) -> Path:
    cmd: list[str | Path] = [sys.executable, "-m", "build", "--wheel", "--outdir", outdir]
    # With the backend already installed, skip the isolated build env (and
    # its index lookup); otherwise let build provision hatchling itself.
    if importlib.util.find_spec("hatchling") is not None:
        cmd.append("--no-isolation")
    run(*cmd, ROOT, cwd=outdir)
    (wheel,) = outdir.glob("conversation-*.whl")
    return wheel


@pytest.mark.slow
def test_installed_wheel_ships_and_finds_its_data(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    dist.mkdir()
    wheel = build_wheel(dist)

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", purelib, cwd=tmp_path).strip())
    # --system-site-packages would expose the base interpreter, not this
    # venv: point the new venv at this venv's packages for the dependencies.
    # A plain path line does not run this venv's .pth files, so the editable
    # install of the checkout stays out of sight.
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = (sys.executable, "-m", "pip", "--python", python)
    run(*pip, "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=tmp_path)

    report = json.loads(run(python, "-c", CHECK, cwd=tmp_path))

    site = Path(report["site"]).resolve()
    package = Path(report["package"]).resolve()
    templates = Path(report["templates"]).resolve()
    assert package.is_relative_to(site), package
    assert templates == site / "conversation" / "prompt_templates"
    assert not templates.is_relative_to(ROOT)
    assert report["template_files"] == sorted(
        p.name for p in (ROOT / "prompt_templates").glob("*.j2")
    )

    repo_lua = sorted(p.name for p in (ROOT / "lua").glob("*.lua"))
    if repo_lua:
        assert report["lua"] is not None, "lua/ is missing from the wheel"
        assert Path(report["lua"]).resolve() == site / "conversation" / "lua"
        assert report["lua_files"] == repo_lua
    # else: nothing to ship yet; hatchling may drop an empty folder.

    for name, prompt in report["rendered"].items():
        assert "Sable" in prompt, name
        assert "(Europe/Paris, UTC" in prompt, name
        assert "[Message ID: 1234]" in prompt, name
