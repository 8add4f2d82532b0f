"""Text PostgreSQL cannot store: NUL characters and unpaired UTF-16 surrogates.

Client input containing them is refused (400) before anything is stored; model output is
repaired with U+FFFD so that a model can never make a store call fail. Also the strict reading
of numbers clients send as text (``ascii_int``).
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel

REPLACEMENT = "\ufffd"

# Only bodies with a \u0000 or \uD800-\uDFFF escape (or a raw NUL byte) need the slow walk.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})|\x00")
_ASCII_DIGITS = re.compile(r"[0-9]+")

M = TypeVar("M", bound=BaseModel)


def is_storable(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clean(text: str) -> str:
    """``text`` with NUL and lone surrogates replaced by U+FFFD (unchanged when storable)."""
    if is_storable(text):
        return text
    text = text.replace("\x00", REPLACEMENT)
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _clean_value(value: Any) -> tuple[Any, bool]:
    if isinstance(value, str):
        cleaned = clean(value)
        return cleaned, cleaned is not value
    if isinstance(value, dict):
        changed = False
        out: dict[Any, Any] = {}
        for key, item in value.items():
            new_key, key_changed = _clean_value(key)
            new_item, item_changed = _clean_value(item)
            out[new_key] = new_item
            changed = changed or key_changed or item_changed
        return (out, True) if changed else (value, False)
    if isinstance(value, list | tuple):
        results = [_clean_value(v) for v in value]
        if any(c for _, c in results):
            return [v for v, _ in results], True
        return value, False
    return value, False


def clean_model(model: M) -> M:
    """A copy of ``model`` with every string cleaned, or ``model`` itself when nothing changed."""
    data = model.model_dump(by_alias=True)
    cleaned, changed = _clean_value(data)
    if not changed:
        return model
    return type(model).model_validate(cleaned)


def _has_unstorable(value: Any) -> bool:
    if isinstance(value, str):
        return not is_storable(value)
    if isinstance(value, dict):
        return any(_has_unstorable(k) or _has_unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_unstorable(v) for v in value)
    return False


def body_has_unstorable_text(body: bytes) -> bool:
    """True when a JSON body holds a string PostgreSQL would refuse (checked before storing)."""
    if not _SUSPECT_ESCAPE.search(body):
        return False
    try:
        return _has_unstorable(json.loads(body))
    except ValueError:
        return False  # malformed JSON is reported by the request parser


def ascii_int(text: str, max_digits: int) -> int | None:
    """``text`` as a non-negative integer if it is 1 to ``max_digits`` ASCII digits, else None.

    ``str.isdigit()`` and ``int()`` each accept other things: superscripts (``"²"`` is a digit
    to ``isdigit`` but not to ``int``), other scripts' digits, signs, spaces and underscores;
    and ``int()`` raises on more than 4,300 digits."""
    if len(text) > max_digits or not _ASCII_DIGITS.fullmatch(text):
        return None
    return int(text)
