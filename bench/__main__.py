"""``make bench``: the store benchmark, then the server benchmark when it exists.

``python -m bench`` runs both; ``python -m bench store`` or ``python -m bench server`` runs one.
"""

from __future__ import annotations

import importlib
import sys


def _server_bench() -> None:
    try:
        module = importlib.import_module("bench.server_bench")
    except ModuleNotFoundError as exc:
        if exc.name != "bench.server_bench":
            raise  # the module exists but something it imports is missing: a real error
        print("\n[bench] bench.server_bench does not exist yet: skipping the server benchmark")
        return
    module.run()


def main(argv: list[str]) -> int:
    which = set(argv) or {"store", "server"}
    unknown = which - {"store", "server"}
    if unknown:
        print(f"usage: python -m bench [store] [server]  (unknown: {', '.join(sorted(unknown))})")
        return 2
    if "store" in which:
        from bench import store_bench

        store_bench.run()
    if "server" in which:
        _server_bench()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
