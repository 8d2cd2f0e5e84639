"""Redact contact addresses from error texts before they leave a service (pure, no I/O).

Error strings come from libraries we do not control: an SMTP server answers
"550 5.1.1 <anna.krasniqi@csw.rks-gov.net>: Recipient address rejected", a webhook gateway
echoes the phone number it refused. Such a text must not reach `notification.failed`, a dead
letter's `dlq_error` header, a delivery row or a log line: `redact_contacts` replaces every
e-mail address with `<e-mail>` and every phone-like number with `<phone>`.

A phone-like number is a run of digits with spaces, dots, dashes, slashes or brackets between
them holding at least 8 digits and either starting with `+`/`00`/`0` or holding 9 or more
digits. An ISO date (2026-11-29) is left alone; an IP address with 9+ digits is redacted too,
which costs nothing in an error text.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"[A-Za-z0-9.!#$%&*+/=?^_`{|}~-][A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")
_PHONE = re.compile(r"(?<![\w.+-])\+?\(?\d[\d \t().\-/]{5,22}\d(?![\w-])")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _phone(m: re.Match[str]) -> str:
    text = m.group(0)
    digits = sum(ch.isdigit() for ch in text)
    if _DATE.match(text) and digits <= 8:
        return text
    lead = text.lstrip("(")
    if digits >= 9 or (digits >= 8 and (lead.startswith(("+", "0")))):
        return "<phone>"
    return text


def redact_contacts(text: str | None) -> str:
    """The text with e-mail addresses and phone numbers replaced (None -> "")."""
    if not text:
        return ""
    return _PHONE.sub(_phone, EMAIL.sub("<e-mail>", text))
