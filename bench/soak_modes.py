"""The soak's two modes side by side (``python -m bench.soak --modes plain,resumable``): the
figures issue 21 asks of resumable replies against today's streams, from one run."""

from __future__ import annotations

from typing import Any

MODES = ("plain", "resumable")

COMPARED = {
    "streams": ("streams", "total"),
    "streams failed by the server": ("errors_reported_by_server",),
    "deltas checked": ("events", "deltas_checked"),
    "lost": ("events", "lost"),
    "duplicated": ("events", "duplicated"),
    "out of order": ("events", "out_of_order"),
    "foreign": ("events", "foreign"),
    "protocol / transport violations": ("protocol_or_transport_violations",),
    "database ok": ("database_verification", "ok"),
    "first event p50 ms (steady)": ("latency_ms", "first_event_steady", "p50"),
    "first event p99 ms (steady)": ("latency_ms", "first_event_steady", "p99"),
    "gap between deltas p99 ms": ("latency_ms", "delta_gap", "p99"),
    "server loop lag p99 ms (load)": ("server_loop_lag_ms", "load", "p99"),
    "pool checked out peak": ("database", "pool_checked_out_peak"),
    "pool checked out median (sampled)": ("database", "pool_checked_out_median_sampled"),
    "pool connection held p50 ms (load)": ("database", "pool_hold_ms", "load", "p50"),
    "pool connection held p99 ms (load)": ("database", "pool_hold_ms", "load", "p99"),
    "pool new connections during load": ("database", "pool_new_connections_during_load"),
    "pg connections peak": ("database", "pg_connections_peak"),
    "pg in use median": ("database", "pg_in_use_median"),
    "KB per open stream": ("memory", "kb_per_open_stream"),
    "server CPU % of a core": ("cpu", "server_utilisation_pct"),
    "server CPU us per delta all in": ("cpu", "server_us_per_delta"),
    "load average at end (1 min)": ("meta", "loadavg_at_end", 0),
}


def compare(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The figures issue 21 asks for, mode by mode (and resumable / plain where both ran)."""
    out: dict[str, dict[str, Any]] = {}
    for name, path in COMPARED.items():
        row: dict[str, Any] = {}
        for mode, report in reports.items():
            value: Any = report
            for key in path:
                value = value.get(key) if isinstance(value, dict) else value[key]
            row[mode] = sum(value.values()) if isinstance(value, dict) else value
        plain, resumable = row.get("plain"), row.get("resumable")
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in (plain, resumable)
        )
        if numbers and plain:
            row["resumable_over_plain"] = round(resumable / plain, 3)
        out[name] = row
    return out


def print_comparison(rows: dict[str, dict[str, Any]]) -> None:
    modes = [m for m in MODES if any(m in row for row in rows.values())]
    print("\n===== soak: the modes side by side =====")
    print(f"  {'':38}" + "".join(f"{m:>14}" for m in modes) + f"{'ratio':>10}")
    for name, row in rows.items():
        ratio = row.get("resumable_over_plain")
        cells = "".join(f"{row.get(m)!s:>14}" for m in modes)
        print(f"  {name:38}{cells}{'' if ratio is None else f'{ratio:>10}'}")
