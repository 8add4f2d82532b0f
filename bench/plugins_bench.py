"""Plugin actions benchmark: what a widget action costs against a plain read of the same thread.

The example plugin (examples/plugin_tasks) on a real PostgreSQL, the whole app in process over
ASGI (JWT auth, limits, parsing, prechecks; no network, so the figures are the server's work).
One user, one thread holding the task widget, requests one at a time:

* baseline: ``items.list`` of that thread (a 3-item page, the ownership check included);
* ``threads.sync_custom_action`` (``tasks.reopen``): precheck (thread, widget), the handler's
  transaction (UPDATE + list), the widget saved, JSON answer;
* ``threads.custom_action`` (``tasks.complete``): the same work, the lease of a streaming
  request, and an SSE response with the replaced widget.

Medians over rounds of ``REQUESTS`` requests each, sides interleaved. Results go to
``bench/results/plugins.json``.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from agents.testing import ScriptedModel, assistant_message, function_call
from alembic import command
from pydantic import SecretStr

from app.chat.plugins import load_plugins
from app.cli.commands import alembic_config
from app.context import RequestContext
from app.main import create_app
from app.settings import Settings
from tests.harness.chatkit_client import (
    JWT_TEST_SECRET,
    done_items,
    parse_sse,
    token_for,
    user_input,
)
from tests.harness.pg import describe, postgres_server

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PLUGIN = "examples.plugin_tasks.plugin:plugin"
REQUESTS = 100
ROUNDS = 5


async def _bench(url: str, data_dir: Path) -> dict[str, Any]:
    settings = Settings(
        database_url=url,
        data_dir=data_dir,
        jwt_secret=SecretStr(JWT_TEST_SECRET),
        chatkit_plugins=[PLUGIN],
        rate_limit_per_minute=0,
        thread_titles="off",
        log_level="WARNING",
    )
    model = ScriptedModel(
        [[function_call("show_tasks", {}, call_id="c1")], [assistant_message("Here.")]]
    )
    app = create_app(settings, model=model)
    headers = {
        "Authorization": f"Bearer {token_for('bench', settings)}",
        "Content-Type": "application/json",
    }
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        db = runtime.server.user_database(RequestContext(user_id="bench"))
        assert db is not None
        async with db.transaction() as conn:
            task_id = await conn.fetchval(
                "INSERT INTO plugin_tasks (user_id, title) VALUES ($1, 'Bench') RETURNING id",
                "bench",
            )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:

            async def post(kind: str, params: dict[str, Any]) -> httpx.Response:
                body = json.dumps({"type": kind, "params": params})
                response = await http.post("/chatkit", content=body, headers=headers)
                assert response.status_code == 200, response.text
                return response

            created = await post("threads.create", {"input": user_input("Show my tasks")})
            events = parse_sse(created.text)
            thread_id = events[0]["thread"]["id"]
            (widget,) = done_items(events, "widget")

            def act(type_: str) -> dict[str, Any]:
                return {
                    "thread_id": thread_id,
                    "item_id": widget["id"],
                    "action": {"type": type_, "payload": {"task_id": task_id}},
                }

            async def items_list() -> None:
                await post("items.list", {"thread_id": thread_id})

            async def sync_action() -> None:
                await post("threads.sync_custom_action", act("tasks.reopen"))

            async def streaming_action() -> None:
                response = await post("threads.custom_action", act("tasks.complete"))
                assert "thread.item.replaced" in response.text

            sides: dict[str, Callable[[], Awaitable[None]]] = {
                "items.list": items_list,
                "sync_custom_action": sync_action,
                "custom_action": streaming_action,
            }
            for side in sides.values():  # warm-up
                for _ in range(20):
                    await side()
            per_round: dict[str, list[float]] = {name: [] for name in sides}
            for round_ in range(ROUNDS):
                order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for name in order:
                    start = time.perf_counter()
                    for _ in range(REQUESTS):
                        await sides[name]()
                    per_round[name].append((time.perf_counter() - start) / REQUESTS * 1000)
    medians = {name: statistics.median(values) for name, values in per_round.items()}
    base = medians["items.list"]
    return {
        "ms_per_request": {k: round(v, 3) for k, v in medians.items()},
        "ratio_to_items_list": {k: round(v / base, 2) for k, v in medians.items()},
        "requests_per_round": REQUESTS,
        "rounds": ROUNDS,
    }


def run() -> None:
    import tempfile

    with postgres_server() as server, tempfile.TemporaryDirectory() as tmp:

        async def main() -> dict[str, Any]:
            url = await server.create_database("ckpg_bench_plugins")
            try:
                cfg = alembic_config(url, load_plugins([PLUGIN]).migration_locations)
                cfg.attributes["skip_logging_config"] = True
                await asyncio.to_thread(command.upgrade, cfg, "heads")
                return await _bench(url, Path(tmp))
            finally:
                await server.drop_database(url)

        result = asyncio.run(main())
    result["postgres"] = describe(server)
    result["python"] = platform.python_version()
    for name, ms in result["ms_per_request"].items():
        ratio = result["ratio_to_items_list"][name]
        print(f"{name:>20}: {ms:7.3f} ms/request  ({ratio:.2f}x items.list)")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "plugins.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    run()
