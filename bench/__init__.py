"""Benchmarks run by ``make bench`` (``python -m bench``); not part of the test suite.

Every figure is measured against a baseline taken in the same run on the same machine, so the
ratios mean something even on a noisy shared box. Results go to ``bench/results/`` (ignored).
"""

from __future__ import annotations

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
