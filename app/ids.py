"""Identifiers with the SDK's prefixes but far more entropy than its 32 random bits."""

from __future__ import annotations

import secrets
import time

from chatkit.store import StoreItemType

PREFIXES: dict[str, str] = {
    "thread": "thr",
    "message": "msg",
    "tool_call": "tc",
    "workflow": "wf",
    "task": "tsk",
    "attachment": "atc",
    "sdk_hidden_context": "shcx",
}


def new_id(kind: StoreItemType | str) -> str:
    """``<prefix>_`` + 48-bit millisecond time + 80 random bits (32 hex characters).

    The time part keeps ids roughly sortable, which helps B-tree locality; the random part
    alone makes a collision between any two ids in the same millisecond ~2^-80.
    """
    prefix = PREFIXES.get(kind, kind)
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"
