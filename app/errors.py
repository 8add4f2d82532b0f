"""The service's own error hierarchy; ``app.main`` maps it to HTTP in one place.

Messages here are written for the client: they never carry exception text from a library.
"""

from __future__ import annotations


class AppError(Exception):
    status_code = 500
    code = "internal_error"
    public_message = "Internal server error."

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        super().__init__(message or self.public_message)
        self.message = message or self.public_message
        # Where in the request the problem is (a path of field names), never a value.
        self.field = field


class InvalidInputError(AppError):
    """The client sent something we cannot store or act on."""

    status_code = 400
    code = "invalid_request"
    public_message = "The request is invalid."


class MissingUserError(AppError):
    """A store call arrived without a user in its context: a programming error, not the client's."""

    status_code = 500
    code = "internal_error"


class RetryLaterError(AppError):
    """An answer that comes with ``Retry-After``: the same request may succeed later."""

    default_retry_after = 1

    def __init__(self, message: str | None = None, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        # Whole seconds, at least 1 (``Retry-After: 0`` invites a tight retry loop).
        self.retry_after = max(1, self.default_retry_after if retry_after is None else retry_after)


class ServiceUnavailableError(RetryLaterError):
    """A dependency (the database, the token issuer) is down or overloaded: retry later."""

    status_code = 503
    code = "unavailable"
    public_message = "The service is temporarily unavailable. Please retry."
    default_retry_after = 2


class TooManyRequestsError(RetryLaterError):
    """A per-user limit (requests per minute, concurrent streams) is reached."""

    status_code = 429
    code = "rate_limited"
    public_message = "Too many requests. Please retry later."


class ThreadBusyError(AppError):
    """Another reply is being written to the same thread (a second tab, a double submit)."""

    status_code = 409
    code = "thread_busy"
    public_message = (
        "This conversation is still answering another message. Please retry when it is done."
    )


class ItemConflictError(AppError):
    """A thread item added under an id the thread already holds, with other content.

    Adding the very same item again (a retry) is harmless; anything else would overwrite what
    is stored, such as a structured input the user has answered (app.pg.store)."""

    status_code = 409
    code = "item_conflict"
    public_message = "The thread already holds a different item with this id."


class AuthenticationError(AppError):
    """Missing, malformed, expired or untrusted bearer token (RFC 6750)."""

    status_code = 401
    code = "unauthorized"
    public_message = "A valid bearer token is required."

    def __init__(self, message: str | None = None, *, bearer_error: str | None = None) -> None:
        super().__init__(message)
        # "invalid_token" when a token was sent; None when there was none at all.
        self.bearer_error = bearer_error

    @property
    def www_authenticate(self) -> str:
        if self.bearer_error is None:
            return 'Bearer realm="chatkit"'
        description = self.message.replace('"', "'")
        return (
            f'Bearer realm="chatkit", error="{self.bearer_error}", '
            f'error_description="{description}"'
        )


class NotFound(AppError):
    """Missing, or another user's: the two are never told apart."""

    status_code = 404
    code = "not_found"
    public_message = "Not found."


class PayloadTooLargeError(AppError):
    status_code = 413
    code = "payload_too_large"
    public_message = "The request body is too large."


class UnsupportedError(AppError):
    """A valid request for a feature this deployment does not offer."""

    status_code = 400
    code = "unsupported"
    public_message = "This operation is not supported by this server."


class ConfigurationError(Exception):
    """The service cannot start with the settings it was given; the message says what to fix."""


class ActionRejectedError(InvalidInputError):
    """A plugin's widget-action handler refused the action's payload (app.chat.plugins).

    Raised by plugin code before any event is streamed, so the client gets a 400 with this
    message; write it for the user, never with exception text inside."""

    code = "action_rejected"
    public_message = "The action was rejected."


# --- attachments (app.files.store, app.files.content, app.files.signing, app.files.uploads) ---


class FileTooLargeError(PayloadTooLargeError):
    """The service-wide 413, with a message about files rather than request bodies."""

    public_message = "The file is larger than the maximum allowed size."


class UnsupportedMediaTypeError(AppError):
    status_code = 415
    code = "unsupported_media_type"
    public_message = "This type of file is not allowed."


class ContentMismatchError(InvalidInputError):
    code = "content_mismatch"
    public_message = "The file's content does not match its declared type or size."


class UploadConflictError(AppError):
    status_code = 409
    code = "upload_conflict"
    public_message = "This attachment has already been uploaded."


class AttachmentInUseError(AppError):
    """An attachment belongs to the thread that first sent it (app.pg.store): another thread may
    not send it, and it cannot be deleted while a message of its thread shows it."""

    status_code = 409
    code = "attachment_in_use"
    public_message = (
        "This file was already sent in another conversation. Upload it again to send it here."
    )


class InvalidSignatureError(AppError):
    status_code = 403
    code = "invalid_signature"
    public_message = "This link is invalid or has expired."
