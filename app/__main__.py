"""Command line: ``python -m app {serve,migrate,token,prune,distribute}``."""

from __future__ import annotations

import sys

from app.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
