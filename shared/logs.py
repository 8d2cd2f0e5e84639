"""Structured logs (structlog): JSON lines carrying `service` and, where known, `event_id`,
`case_id` and `correlation_id`. Never log a name, birth date, address, phone or free text:
log ids and types only.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import structlog

# Keys that must never reach a log line; a value logged under one of them is replaced.
PERSONAL_KEYS = frozenset({
    "given_name", "family_name", "name", "first_name", "last_name", "full_name", "date_of_birth",
    "birth_date", "dob", "address", "phone", "phone_number", "guardian_name", "guardian_phone",
    "guardian_contact", "email", "e_mail", "notes", "note", "body", "personal",
})
_PHONE = re.compile(r"\+?\d[\d ()-]{7,}\d")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


def redact_personal_data(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Last line of defence: drop values under personal-data keys, and mask phone numbers and
    e-mail addresses inside messages (including exception text from libraries)."""
    for key in list(event):
        if key.lower() in PERSONAL_KEYS:
            event[key] = "[redacted]"
    for key in ("event", "exception"):
        value = event.get(key)
        if isinstance(value, str):
            value = _EMAIL.sub("[email]", value)
            event[key] = _PHONE.sub("[phone]", value)
    return event


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Bind fields (event_id, case_id, correlation_id) to every log line inside the block."""
    clean = {k: str(v) for k, v in fields.items() if v is not None}
    tokens = structlog.contextvars.bind_contextvars(**clean)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)


def bound_to_envelope(envelope: Any) -> contextlib.AbstractContextManager[None]:
    """Log context for handling one event: its id, case id (subject) and correlation id."""
    return bound(event_id=envelope.id, event_type=envelope.type, case_id=envelope.subject,
                 correlation_id=envelope.correlationid, traceparent=getattr(envelope, "traceparent", None))


def new_correlation_id() -> str:
    return str(uuid.uuid4())


def current_traceparent() -> str | None:
    """The W3C trace context bound to this request or event, if any."""
    return structlog.contextvars.get_contextvars().get("traceparent")


def current_correlation_id() -> str | None:
    """The correlation id bound to this request or event, if any (HTTP: `X-Correlation-Id`)."""
    return structlog.contextvars.get_contextvars().get("correlation_id")


def configure_logging(service: str, *, level: str = "INFO", json: bool = True) -> None:
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        timestamper,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.format_exc_info, redact_personal_data, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "faust", "mode", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
