"""The hostile suites' helpers checked by pytest's assert rewriting, and the Reliability table
(docs/reliability.md): a report at the end of the session, not a test.

Every hostile case counts itself in ``STATS`` (tests/harness/hostile_world.py) and fails its own
test when a check is lost, so the table checks nothing: it only shows, whatever ran in whatever
order, how many cases each input class sent and how they were answered."""

from __future__ import annotations

import sys

import pytest

# Helper modules whose assert statements check answers (pytest rewrites test modules only):
# registered before anything imports them.
pytest.register_assert_rewrite("tests.harness.hostile_world", "tests.harness.hostile_cases")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "tests.harness.hostile_world" not in sys.modules:
        return  # no hostile test was collected
    from tests.harness.hostile_fuzz import reliability_table
    from tests.harness.hostile_world import CLASSES, STATS

    ran = [cls for cls in (*CLASSES, *sorted(set(STATS) - set(CLASSES))) if STATS[cls]["cases"]]
    if ran:
        terminalreporter.write_sep("-", "Reliability: hostile cases per input class")
        terminalreporter.write_line(reliability_table(tuple(ran)))
