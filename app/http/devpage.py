"""The development chat page: ``GET /`` (ChatKit's web component) and ``GET /dev/token``.

Someone trying chatkit-pg runs ``make run`` and opens http://127.0.0.1:8000/: the page loads
``<openai-chatkit>`` from OpenAI's CDN (the only place the component is published) and points
it at this backend, with a token for the development user from ``GET /dev/token``.

Both routes exist only in development mode: no ``JWT_SECRET``, no ``JWT_JWKS_URL``, no
``PRODUCTION``. Otherwise they are never registered, so they answer like any unknown path. In
development mode they still answer 404 unless the request is local: the client is a loopback
address *and* the ``Host`` header names a loopback host. The second check stops DNS rebinding,
where a web page the developer visits resolves its own name to 127.0.0.1 and would otherwise
read a token from the same origin.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import mimetypes
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.http.auth import auth_mode, mint_token
from app.settings import Settings

PAGE_FILE = Path(__file__).with_name("devpage.html")
CHATKIT_SCRIPT_URL = "https://cdn.platform.openai.com/deployments/chatkit/chatkit.js"
# ChatKit requires a domain key; on localhost a placeholder is accepted. A deployed frontend
# uses the key OpenAI issues for its registered domain (frontend/.env.example).
LOCAL_DOMAIN_KEY = "domain_pk_localhost_dev"
TOKEN_PATH = "/dev/token"  # noqa: S105 (a path)
TOKEN_TTL_SECONDS = 24 * 3600
# The user of the token `make run` prints (app/cli/serve.py), so the curl's threads show up here.
DEV_USER = "dev"
_LOOPBACK_NAMES = frozenset({"localhost"})
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def enabled(settings: Settings) -> bool:
    """Development mode: tokens are signed with the development secret in ``DATA_DIR``."""
    return auth_mode(settings) == "dev" and not settings.production


def install(app: FastAPI, settings: Settings) -> None:
    """Add the page and the token route to ``app``, in development mode only."""
    if enabled(settings):
        app.include_router(router)


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``Host`` without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_local(request: Request) -> bool:
    client = request.client
    if client is None or not _is_loopback_address(client.host):
        return False
    host = _host_name(request.headers.get("host", "")).lower().rstrip(".")
    return host in _LOOPBACK_NAMES or host.endswith(".localhost") or _is_loopback_address(host)


def _require_local(request: Request) -> None:
    if not is_local(request):
        raise StarletteHTTPException(404)


def page_config(settings: Settings) -> dict[str, Any]:
    """What the page's script needs from the settings (no secrets)."""
    accept = {
        mime: sorted(mimetypes.guess_all_extensions(mime, strict=False))
        for mime in settings.allowed_mime_types
    }
    return {
        "chatkitPath": settings.chatkit_path,
        "tokenPath": TOKEN_PATH,
        "scriptUrl": CHATKIT_SCRIPT_URL,
        "domainKey": LOCAL_DOMAIN_KEY,
        "maxUploadBytes": settings.max_upload_bytes,
        "accept": accept,
    }


@cache
def _template() -> str:
    return PAGE_FILE.read_text(encoding="utf-8")


def render_page(settings: Settings) -> str:
    # JSON inside <script type="application/json">: "<" escaped so no value can close the tag.
    config = json.dumps(page_config(settings), separators=(",", ":")).replace("<", "\\u003c")
    return _template().replace("__CHATKIT_PG_CONFIG__", config)


router = APIRouter(include_in_schema=False)


@router.get("/")
async def chat_page(request: Request) -> HTMLResponse:
    _require_local(request)
    return HTMLResponse(render_page(request.app.state.settings), headers=_NO_STORE)


@router.get(TOKEN_PATH)
async def dev_token(request: Request) -> JSONResponse:
    _require_local(request)
    # In a thread: mint_token may create the development secret file on first use.
    token = await asyncio.to_thread(
        mint_token, request.app.state.settings, DEV_USER, ttl_seconds=TOKEN_TTL_SECONDS
    )
    return JSONResponse({"token": token}, headers=_NO_STORE)
