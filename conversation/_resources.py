"""Locate the data directories shipped with the package (Lua scripts, templates).

An installed wheel carries them inside the package (``conversation/lua``); a
source checkout keeps them at the repository root (``lua/``), which is also what
an editable install sees.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"packaged data directory {name!r} not found next to {_PACKAGE_DIR}")
