"""The service's own error hierarchy; ``app.main`` maps it to HTTP in one place.

Messages here are written for the client: they never carry exception text from a library.
"""

from __future__ import annotations


class AppError(Exception):
    status_code = 500
    code = "internal_error"
    public_message = "Internal server error."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.public_message)
        self.message = message or self.public_message


class InvalidInputError(AppError):
    """The client sent something we cannot store or act on."""

    status_code = 400
    code = "invalid_request"
    public_message = "The request is invalid."


class MissingUserError(AppError):
    """A store call arrived without a user in its context: a programming error, not the client's."""

    status_code = 500
    code = "internal_error"


class ServiceUnavailableError(AppError):
    status_code = 503
    code = "unavailable"
    public_message = "The service is temporarily unavailable. Please retry."
