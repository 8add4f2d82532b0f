"""Signed URLs for what a browser fetches without a Bearer token: the two-phase upload URL and
an image's ``preview_url``. An HMAC over purpose, user, attachment id and expiry; the key is
``ATTACHMENT_SIGNING_SECRET`` (shared by every replica), else a random one kept in ``DATA_DIR``
for development. app.files.store re-signs the URLs whenever an attachment is loaded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

from app.errors import InvalidSignatureError
from app.ids import MAX_USER_ID_CHARS
from app.sanitize import ascii_int
from app.settings import Settings

FILES_PREFIX = "/files"
Purpose = Literal["upload", "preview"]

MAX_EXPIRY_DIGITS = 12
"""Unix seconds: 10 digits until 2286, 12 until the year 33658."""
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")
"""Unpadded URL-safe base64 of an HMAC-SHA256 digest (32 bytes)."""


def signing_secret(settings: Settings) -> bytes:
    """``ATTACHMENT_SIGNING_SECRET``, else a random key kept in ``DATA_DIR`` (development).

    Several replicas must share one key: set the variable in production.
    """
    if settings.attachment_signing_secret is not None:
        return settings.attachment_signing_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / "attachment-signing.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


class UrlSigner:
    """HMAC-SHA256 over (purpose, user, attachment, expiry) for URLs without a Bearer token.

    Expiry times are rounded up to a step of a tenth of the TTL, so loading a thread twice in a
    row yields the same preview URL and the browser's cache keeps working.
    """

    def __init__(
        self,
        secret: bytes,
        base_url: str,
        ttl_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the URL signing secret must be at least 16 bytes")
        self._key = hashlib.sha256(b"chatkit-pg attachment urls\x00" + secret).digest()
        self.base_url = base_url.rstrip("/")
        self.ttl = ttl_seconds
        self._step = max(1, ttl_seconds // 10)
        self._clock = clock

    def expiry(self) -> int:
        deadline = int(self._clock()) + self.ttl
        return -(-deadline // self._step) * self._step

    def signature(self, purpose: Purpose, user_id: str, attachment_id: str, expires: int) -> str:
        # surrogatepass: text from a URL that no id can hold must fail the comparison, not
        # the encoding (the bytes of every real id are the same either way).
        msg = "\x00".join(("v1", purpose, user_id, attachment_id, str(expires)))
        msg_bytes = msg.encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, msg_bytes, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def url(self, purpose: Purpose, user_id: str, attachment_id: str) -> str:
        expires = self.expiry()
        query = urlencode(
            {
                "u": user_id,
                "e": expires,
                "s": self.signature(purpose, user_id, attachment_id, expires),
            }
        )
        return f"{self.base_url}{FILES_PREFIX}/{quote(attachment_id, safe='')}/{purpose}?{query}"

    def verify(
        self,
        purpose: Purpose,
        user_id: str | None,
        attachment_id: str,
        expires: str | None,
        signature: str | None,
    ) -> int:
        """Return the expiry time, or raise ``InvalidSignatureError`` (forged, altered, expired).

        Every field is read strictly before any work: the expiry as ASCII digits of a bounded
        length (``str.isdigit`` passes ``"²"``, which ``int`` then refuses; ``int`` refuses
        more than 4,300 digits), the signature as what ``signature`` makes, the user id no
        longer than a token may name (app.http.auth)."""
        exp = ascii_int(expires, MAX_EXPIRY_DIGITS) if expires else None
        if (
            exp is None
            or not user_id
            or len(user_id) > MAX_USER_ID_CHARS
            or not signature
            or not _SIGNATURE.fullmatch(signature)
        ):
            raise InvalidSignatureError()
        good = self.signature(purpose, user_id, attachment_id, exp)
        if not hmac.compare_digest(good.encode(), signature.encode()):
            raise InvalidSignatureError()
        if exp < self._clock():
            raise InvalidSignatureError("This link has expired.")
        return exp
