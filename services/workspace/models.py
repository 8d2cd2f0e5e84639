"""What the workspace knows without I/O: words in three languages, the development officers, the
identification form (form fields -> API body, API errors -> the field they belong to), and how
deadlines read. Pure functions only (no FastAPI, no HTTP client), so unit tests cover them.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from shared.events import AgencyType
from shared.reference import agency_offices, municipalities, municipality_slugs

HERE = Path(__file__).parent
LANGUAGES = ("sq", "sr", "en")
LANGUAGE_NAMES = {"sq": "Shqip", "sr": "Srpski", "en": "English"}
LOCAL_TZ = ZoneInfo("Europe/Belgrade")  # Kosovo's civil time

# Agencies whose officers may report a child (intake decides; this only shapes the menu and the
# development tokens).
REPORTING_AGENCIES = frozenset({"police", "labour_inspectorate", "csw", "education", "ngo"})


# --- words ----------------------------------------------------------------------------------------


@functools.cache
def messages() -> dict[str, Any]:
    return yaml.safe_load((HERE / "messages.yaml").read_text(encoding="utf-8"))


def pick_language(value: str | None) -> str | None:
    """'sr', 'sr-Latn-RS', 'en-GB', ... -> one of LANGUAGES, else None."""
    if not value:
        return None
    base = value.strip().lower().split("-")[0].split("_")[0]
    return base if base in LANGUAGES else None


def language_from_header(accept_language: str | None) -> str:
    """The first supported language of an Accept-Language header; Albanian otherwise."""
    for part in (accept_language or "").split(","):
        lang = pick_language(part.split(";")[0])
        if lang:
            return lang
    return "sq"


class Words:
    """`t('key')` and `label('sector', code)` in one language (the templates' `t` and `label`)."""

    def __init__(self, language: str):
        self.language = language if language in LANGUAGES else "sq"

    def t(self, key: str, **kw: Any) -> str:
        entry = messages()["text"].get(key)
        if entry is None:
            return key
        text = entry.get(self.language) or entry["en"]
        return text.format(**kw) if kw else text

    def label(self, kind: str, code: Any) -> str:
        if code is None or code == "":
            return "–"
        entry = messages()["labels"].get(kind, {}).get(str(code))
        if entry:
            return entry.get(self.language) or entry["en"]
        return str(code).replace("_", " ")

    def municipality(self, slug: str) -> str:
        m = municipalities().get(slug)
        if m is None:
            return slug
        return {"sq": m.name_sq, "sr": m.name_sr}.get(self.language, m.name_en)

    def office(self, office_id: str | None) -> str:
        """'csw.prizren' -> 'Centre for Social Work Prizren' in the user's language."""
        if not office_id or "." not in office_id:
            return office_id or "–"
        agency, muni = office_id.split(".", 1)
        return f"{self.label('agency', agency)} {self.municipality(muni)}"

    def duration(self, delta: timedelta) -> str:
        minutes = max(0, int(delta.total_seconds() // 60))
        days, rest = divmod(minutes, 24 * 60)
        hours, mins = divmod(rest, 60)
        d, h, m = self.t("unit_day"), self.t("unit_hour"), self.t("unit_minute")
        if days:
            return f"{days} {d} {hours} {h}"
        if hours:
            return f"{hours} {h} {mins} {m}"
        return f"{mins} {m}"


def local_time(value: Any) -> str:
    if value in (None, ""):
        return "–"
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(LOCAL_TZ).strftime("%Y-%m-%d %H:%M")


@dataclass(frozen=True)
class DeadlineView:
    text: str
    overdue: bool


def deadline_view(referral: dict[str, Any], words: Words, *, now: datetime) -> DeadlineView:
    """'3 h 20 min left' or 'overdue by 2 h 5 min' (words, not only a colour). A referral that
    was acted on in time (acknowledged, accepted, ...) is not counted down any more."""
    deadline = datetime.fromisoformat(str(referral["deadline"]))
    if referral.get("overdue"):
        return DeadlineView(words.t("overdue_by", d=words.duration(now - deadline)), True)
    if referral.get("status") != "pending":
        return DeadlineView("", False)
    if deadline <= now:
        return DeadlineView(words.t("overdue_by", d=words.duration(now - deadline)), True)
    return DeadlineView(words.t("time_left", d=words.duration(deadline - now)), False)


# --- development officers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Officer:
    """A seeded development officer: `<agency>.<municipality>.duty|supervisor`, `coordinator.<m>`."""

    sub: str
    agency: str
    municipality: str
    kind: str  # duty | supervisor | coordinator

    @property
    def roles(self) -> tuple[str, ...]:
        if self.kind == "coordinator":
            return ("coordinator",)
        roles = ["duty_officer" if self.kind == "duty" else "supervisor", "caseworker"]
        if self.agency in REPORTING_AGENCIES:
            roles.append("reporter")
        return tuple(roles)


def officers_of(municipality: str) -> list[Officer]:
    """The seeded officers of one municipality, the way the notifications seed names them."""
    out: list[Officer] = []
    for office in agency_offices().values():
        if office.municipality != municipality:
            continue
        if office.agency == AgencyType.coordinator.value:
            out.append(Officer(f"coordinator.{municipality}", "coordinator", municipality, "coordinator"))
            continue
        for kind in ("duty", "supervisor"):
            out.append(Officer(f"{office.agency}.{municipality}.{kind}", office.agency, municipality, kind))
    order = {a.value: i for i, a in enumerate(AgencyType)}
    return sorted(out, key=lambda o: (order.get(o.agency, 99), o.kind != "duty"))


def officer(sub: str) -> Officer | None:
    """The development officer with this subject, or None when it is not a seeded one."""
    parts = sub.split(".")
    if len(parts) == 2 and parts[0] == "coordinator":
        muni = parts[1]
    elif len(parts) == 3:
        muni = parts[1]
    else:
        return None
    if muni not in municipality_slugs():
        return None
    return next((o for o in officers_of(muni) if o.sub == sub), None)


# --- the identification form ------------------------------------------------------------------------


@functools.cache
def activities() -> dict[str, list[str]]:
    """Sector -> activity codes (a copy of intake's list; a unit test keeps them equal)."""
    return yaml.safe_load((HERE / "activities.yaml").read_text(encoding="utf-8"))


FORM_FIELDS = (
    "municipality", "identified_on", "report_source",
    "child.given_name", "child.family_name", "child.date_of_birth", "child.estimated_age",
    "child.sex", "child.community", "child.school_status",
    "child.guardian.name", "child.guardian.relationship", "child.guardian.phone",
    "work.activity", "work.hazardous", "work.employer_involved", "notes",
)
REQUIRED = ("municipality", "identified_on", "child.given_name", "child.family_name", "child.sex",
            "work.activity")
CHECKBOXES = ("work.hazardous", "work.employer_involved")


@dataclass
class ParsedForm:
    body: dict[str, Any]
    errors: dict[str, str] = field(default_factory=dict)  # form field -> message


def parse_identification(form: dict[str, str], words: Words) -> ParsedForm:
    """Form fields -> the body of POST /v1/identifications. Empty optional fields are left out;
    only what a person can fix at a glance is checked here (required fields, age), every other
    rule is intake's and comes back as a 422 naming the field (`field_errors`)."""
    v = {k: (form.get(k) or "").strip() for k in FORM_FIELDS}
    errors: dict[str, str] = {}
    for name in REQUIRED:
        if not v[name]:
            errors[name] = words.t("required")
    age: Any = None
    if v["child.estimated_age"]:
        age = int(v["child.estimated_age"]) if v["child.estimated_age"].isdigit() else None
        if age is None:
            errors["child.estimated_age"] = words.t("whole_number")
    if not v["child.date_of_birth"] and not v["child.estimated_age"]:
        errors["child.date_of_birth"] = words.t("age_or_dob")
    sector, _, activity = v["work.activity"].partition(":")
    guardian = {k: v[f"child.guardian.{k}"] for k in ("name", "relationship", "phone") if v[f"child.guardian.{k}"]}
    child: dict[str, Any] = {
        "given_name": v["child.given_name"], "family_name": v["child.family_name"],
        "sex": v["child.sex"] or None,
    }
    if v["child.date_of_birth"]:
        child["date_of_birth"] = v["child.date_of_birth"]
    if age is not None:
        child["estimated_age"] = age
    for k in ("community", "school_status"):
        if v[f"child.{k}"]:
            child[k] = v[f"child.{k}"]
    if guardian:
        child["guardian"] = guardian
    body: dict[str, Any] = {
        "municipality": v["municipality"],
        "identified_on": v["identified_on"],
        "report_source": v["report_source"] or "officer",
        "child": child,
        "work": {"sector": sector, "activity": activity,
                 "hazardous": form.get("work.hazardous") in ("on", "true", "1"),
                 "employer_involved": form.get("work.employer_involved") in ("on", "true", "1")},
    }
    if v["notes"]:
        body["notes"] = v["notes"]
    return ParsedForm(body=body, errors=errors)


_PREFIX = re.compile(r"^((?:child|work)(?:\.[a-z_]+)+|municipality|identified_on|notes|report_source): ")


def form_field(api_field: str, message: str) -> str | None:
    """Where a 422 error of intake belongs on the form ('child.guardian.phone' -> that input;
    'work.sector' -> the activity list; a model-level message 'child.date_of_birth: ...' -> that
    input). None: show it above the form."""
    name = api_field
    if name in ("body", "child", "work", "") or name not in FORM_FIELDS:
        m = _PREFIX.match(message)
        if m:
            name = m.group(1)
        elif api_field == "child":
            name = "child.date_of_birth"  # the only child-level rule: a birth date or an age
        elif api_field == "work":
            name = "work.activity"
    if name == "work.sector":
        name = "work.activity"
    return name if name in FORM_FIELDS else None


# pydantic error types whose English message is not words for a person: said in the user's language
_TYPE_WORDS = {"missing": "required", "date_from_datetime_parsing": "date_format", "date_parsing": "date_format",
               "string_too_long": "too_long", "int_parsing": "whole_number"}


def field_errors(errors: list[dict[str, Any]], words: Words | None = None) -> tuple[dict[str, str], list[str]]:
    """Intake's 422 `errors` -> (messages per form field, messages without a field). Intake's own
    sentences stay as they are; a bare pydantic message (a regular expression, 'Field required')
    becomes a sentence in the user's language."""
    words = words or Words("en")
    per_field: dict[str, str] = {}
    general: list[str] = []
    for err in errors:
        message = str(err.get("message") or err.get("msg") or "invalid")
        name = form_field(str(err.get("field") or ""), message)
        kind = str(err.get("type") or "")
        if name == "child.guardian.phone" and kind == "string_pattern_mismatch":
            message = words.t("phone_format")
        elif kind in _TYPE_WORDS:
            message = words.t(_TYPE_WORDS[kind])
        message = _PREFIX.sub("", message)
        if name:
            per_field.setdefault(name, message[:1].upper() + message[1:])
        else:
            general.append(message)
    return per_field, general
