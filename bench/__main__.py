"""``make bench``: every benchmark, each against a baseline measured in the same run.

``python -m bench`` runs them all; ``python -m bench store server`` (any subset of
store, server, runs, turns, attachments, memory, deploy, plugins, citus,
stall, userdata, search) runs those. Results land in ``bench/results/*.json``.
"""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "store": "bench.store_bench",
    "server": "bench.server_bench",
    "runs": "bench.runs_bench",
    "turns": "bench.turn_bench",
    "attachments": "bench.attachments_bench",
    "memory": "bench.memory_bench",
    "deploy": "bench.deploy_bench",
    "plugins": "bench.plugins_bench",
    "citus": "bench.citus_bench",
    "stall": "bench.stall_bench",
    "userdata": "bench.userdata_bench",
    "search": "bench.search_bench",
}


def main(argv: list[str]) -> int:
    which = argv or list(BENCHES)
    unknown = [w for w in which if w not in BENCHES]
    if unknown:
        print(f"usage: python -m bench [{' '.join(BENCHES)}]  (unknown: {', '.join(unknown)})")
        return 2
    for name in which:
        print(f"\n===== bench: {name} =====", flush=True)
        importlib.import_module(BENCHES[name]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
