"""Identifiers: the ones we make (the SDK's prefixes with far more entropy than its 32 random
bits), and the one check every id a client sends passes before it reaches SQL."""

from __future__ import annotations

import secrets
import time

from chatkit.store import StoreItemType
from pydantic import BaseModel

from app.errors import InvalidInputError
from app.sanitize import is_storable

PREFIXES: dict[str, str] = {
    "thread": "thr",
    "message": "msg",
    "tool_call": "tc",
    "workflow": "wf",
    "task": "tsk",
    "attachment": "atc",
    "sdk_hidden_context": "shcx",
}

MAX_USER_ID_CHARS = 255
"""The longest user id a token may name (app.http.auth), or a signed URL carry (app.files.signing)."""
MAX_ID_CHARS = 128
"""The longest id a client may send. Ids are key columns: the feedback table's primary key
holds a user id (``MAX_USER_ID_CHARS``), a thread id and an item id, and a B-tree
entry may not exceed 2,704 bytes. At 4 UTF-8 bytes a character, 255 + 2 x 128 characters make
at most 2,044 bytes, whatever the text (random text does not compress). Ours have 37
characters, the SDK's about 12."""

ID_FIELDS = frozenset({"thread_id", "item_id", "attachment_id", "item_ids", "after", "attachments"})
"""The fields of the ChatKit protocol's requests that name stored objects, at any depth
(``params.input.attachments`` too); tests/http/test_input_bounds.py checks the SDK has no others."""


def new_id(kind: StoreItemType | str) -> str:
    """``<prefix>_`` + 48-bit millisecond time + 80 random bits (32 hex characters).

    The time part keeps ids roughly sortable, which helps B-tree locality; the random part
    alone makes a collision between any two ids in the same millisecond ~2^-80.
    """
    prefix = PREFIXES.get(kind, kind)
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def check_id(value: str, field: str | None = None) -> str:
    """``value`` if it can be an id; else a 400 (before any SQL sees it). Too long an id would
    fail an index insert (a 500); a NUL or a lone surrogate cannot be sent to PostgreSQL at
    all. An id that passes and names nothing is the store's 404, as before."""
    if len(value) > MAX_ID_CHARS:
        raise InvalidInputError(f"An id has at most {MAX_ID_CHARS} characters.", field=field)
    if not is_storable(value):
        raise InvalidInputError(
            "An id may not contain NUL characters or unpaired surrogates.", field=field
        )
    return value


def check_ids(model: BaseModel, path: str) -> None:
    """Every id in a parsed request's ``params`` (``ID_FIELDS``, in nested models too);
    ``path`` names ``model`` in the error's ``field``."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            check_ids(value, f"{path}.{name}")
        elif name not in ID_FIELDS:
            continue
        elif isinstance(value, str):
            check_id(value, f"{path}.{name}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    check_id(item, f"{path}.{name}.{index}")
