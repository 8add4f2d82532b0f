"""``python -m app serve``: uvicorn (uvloop, httptools) and the lines a developer needs first."""

from __future__ import annotations

import json
import math
import shlex

import uvicorn

from app.http.auth import auth_mode, mint_token
from app.http.drain import SAVE_SECONDS
from app.settings import Settings

DEV_USER = "dev"


def _public_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def try_it(settings: Settings) -> str:
    """A token (when this server can sign one) and a curl that creates a thread and streams."""
    base = f"http://{_public_host(settings.host)}:{settings.port}"
    lines = [f"chatkit-pg: ChatKit endpoint at {base}{settings.chatkit_path}"]
    mode = auth_mode(settings)
    if mode == "dev" and not settings.production:  # app/http/devpage.py
        lines.append(f"Chat page (development, this machine only): {base}/")
    if mode == "jwks":
        lines.append("Use a token from your identity provider:  export TOKEN=<jwt>")
    elif settings.production:
        lines.append("Production mode: sign tokens with JWT_SECRET; export TOKEN=<jwt>")
    else:
        token = mint_token(settings, DEV_USER)
        which = "the development secret in DATA_DIR" if mode == "dev" else "JWT_SECRET"
        lines.append(f'A token for user "{DEV_USER}" (24 h, signed with {which}):')
        lines.append(f"  export TOKEN={token}")
    body = json.dumps(
        {
            "type": "threads.create",
            "params": {
                "input": {
                    "content": [{"type": "input_text", "text": "Hello! What can you do?"}],
                    "attachments": [],
                    "inference_options": {},
                }
            },
        },
        separators=(",", ":"),
    )
    lines.append("Create a thread and stream a reply:")
    lines.append(
        f"  curl -N {base}{settings.chatkit_path} "
        '-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" '
        f"-d {shlex.quote(body)}"
    )
    return "\n".join(lines)


def run_uvicorn(settings: Settings) -> None:
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        # A backstop: the app ends its streams within SHUTDOWN_GRACE_SECONDS and the saves
        # that follow (app.http.drain); uvicorn's own cut would end them without an error event.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds + SAVE_SECONDS) + 5,
    )
