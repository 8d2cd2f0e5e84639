"""The one error model of every service: use cases raise these, `shared.web` maps them to HTTP once.

Pure (no FastAPI import): a rules module or a worker may raise them too. The message is the
sentence the user sees, so it says what was wrong and what to do about it; it never carries
personal data (it ends up in an HTTP answer and may end up in a log line).
"""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base of the hierarchy; `status` is the HTTP status the answer carries.

    `detail` replaces the plain message in the answer's `detail` field when a client needs more
    than a sentence (e.g. the current state in a 409); `headers` are added to the answer
    (e.g. Retry-After on a 503).
    """

    status: ClassVar[int] = 400

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = message if detail is None else detail
        self.headers = dict(headers or {})


class Invalid(ServiceError):
    """The request is well-formed JSON but breaks a rule (422); the message names the field."""

    status = 422


class Unauthenticated(ServiceError):
    """No credentials, or credentials that do not verify (401)."""

    status = 401


class Forbidden(ServiceError):
    """The caller is known but may not do this (403); the message says which rule refused."""

    status = 403


class NotFound(ServiceError):
    """Nothing with that id (404), or nothing the caller may see: the two read the same."""

    status = 404


class Conflict(ServiceError):
    """The request contradicts the current state (409)."""

    status = 409


class Unavailable(ServiceError):
    """A dependency (database, broker) is away (503); the message says when to retry."""

    status = 503

    def __init__(self, message: str, *, detail: Any = None, headers: dict[str, str] | None = None,
                 retry_after_s: int = 5) -> None:
        super().__init__(message, detail=detail, headers={"Retry-After": str(retry_after_s), **(headers or {})})
