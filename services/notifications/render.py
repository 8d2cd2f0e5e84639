"""Messages from jinja2 templates (`templates/<language>/<event type>.j2`, blocks `subject` and
`body`, extending `templates/<language>/_layout.j2` which adds the footer) in Albanian (sq), Serbian (sr, Latin script) and English (en).

Only whitelisted, non-personal fields reach a template (`ALLOWED_FIELDS`): the case id,
referral id, municipality, agency, deadline, priority, sector, age band, legal basis, codes of
reasons and outcomes, and a link. A template cannot print what it is not given.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
import yaml

from services.notifications.directory import municipality_name

TEMPLATES = Path(__file__).parent / "templates"
LANGUAGES = ("sq", "sr", "en")
BODY_MARKER = "@@body@@"  # the line in each _layout.j2 between the subject and the body
LOCAL_TZ = ZoneInfo("Europe/Belgrade")  # Kosovo's civil time (CET/CEST)

ALLOWED_FIELDS = frozenset({
    "referral_id", "case_id", "municipality", "agency", "office_id", "priority", "deadline",
    "legal_basis", "age_band", "sector", "status", "reason", "outcome", "within_deadline", "case_reason",
})


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str
    link: str


@functools.cache
def labels() -> dict[str, dict[str, dict[str, str]]]:
    return yaml.safe_load((TEMPLATES / "labels.yaml").read_text(encoding="utf-8"))


@functools.cache
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails the unit tests, not an officer
        autoescape=False,  # plain-text e-mail and SMS
        keep_trailing_newline=False,
        auto_reload=False,  # templates ship with the service: no stat() of the files per message
    )


@functools.cache
def _template(language: str, event_type: str) -> jinja2.Template:
    return _env().get_template(f"{language}/{event_type}.j2")


def _label(kind: str, code: Any, language: str) -> str:
    if code is None or code == "":
        return "–"
    entry = labels().get(kind, {}).get(str(code))
    return entry.get(language, entry["en"]) if entry else str(code).replace("_", " ")


def format_deadline(value: Any) -> str:
    if value in (None, ""):
        return "–"
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return dt.astimezone(LOCAL_TZ).strftime("%Y-%m-%d %H:%M %Z")


def referral_link(base_url: str, *, referral_id: Any) -> str:
    """The referral's page in the workspace (`WORKSPACE_URL`), which the officer opens signed in."""
    return f"{base_url.rstrip('/')}/referrals/{referral_id}"


def context(facts: dict[str, Any], *, language: str, base_url: str) -> dict[str, Any]:
    """Template variables from the event (and stored referral) facts; anything not in
    ALLOWED_FIELDS is dropped here, before a template sees it."""
    f = {k: v for k, v in facts.items() if k in ALLOWED_FIELDS}
    agency = str(f.get("agency") or "")
    return {
        "case_id": str(f.get("case_id") or "–"),
        "referral_id": str(f.get("referral_id") or "–"),
        "municipality": municipality_name(f["municipality"], language) if f.get("municipality") else "–",
        "agency": _label("agency", agency, language),
        "agency_code": agency,
        "priority": _label("priority", f.get("priority"), language),
        "priority_code": f.get("priority") or "",
        "deadline": format_deadline(f.get("deadline")),
        "legal_basis": f.get("legal_basis") or "–",
        "age_band": _label("age_band", f.get("age_band"), language),
        "sector": _label("sector", f.get("sector"), language),
        "status": str(f.get("status") or "–").replace("_", " "),
        "reason": str(f.get("reason") or "–").replace("_", " "),
        "outcome": str(f.get("outcome") or "–").replace("_", " "),
        "case_reason": str(f.get("case_reason") or "–").replace("_", " "),
        "within_deadline": f.get("within_deadline"),
        "link": referral_link(base_url, referral_id=f.get("referral_id")),
    }


def render(event_type: str, language: str, facts: dict[str, Any], *, base_url: str) -> Rendered:
    if language not in LANGUAGES:
        language = "sq"
    ctx = context(facts, language=language, base_url=base_url)
    text = _template(language, event_type).render(ctx)
    subject, _, body = text.partition(BODY_MARKER)
    subject = " ".join(subject.split())
    body = body.strip("\n").rstrip() + "\n"
    return Rendered(subject=subject, body=body, link=ctx["link"])

