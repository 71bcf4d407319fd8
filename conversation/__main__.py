"""``python -m conversation``: the operator CLI and the multi-process demo."""

from __future__ import annotations

import sys

from conversation._tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
