"""The officer directory as data: the development seed and roster validation.

Pure: no database, broker or web imports. `service.py` stores what this module produces.

Roster CSV columns (header required, order free):
    officer_id,agency,municipality,office_id,role,language,email,phone,inapp,on_duty

- officer_id: the officer's JWT subject (e.g. `csw.prizren.duty`)
- role: duty_officer | supervisor | coordinator
- language: sq | sr | en
- email, phone: optional (phone in E.164, e.g. +38344123456; SMS only for officers with one)
- inapp, on_duty: true/false (also yes/no, 1/0)
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.events import AgencyType
from shared.reference import agency_offices, municipalities, municipality_slugs

SEED_FILE = Path(__file__).parent / "officers_seed.csv"

ROLES = ("duty_officer", "supervisor", "coordinator")
LANGUAGES = ("sq", "sr", "en")
COLUMNS = ("officer_id", "agency", "municipality", "office_id", "role", "language",
           "email", "phone", "inapp", "on_duty")
REQUIRED = ("officer_id", "agency", "municipality", "office_id", "role", "language")

# The ten municipalities with a Kosovo-Serb majority (the municipalities named for the
# Association/Community of Serb-majority municipalities in the 2013 Brussels agreement).
# Their officers get Serbian by default; every other municipality Albanian. Both are official
# languages everywhere, so an officer's own preference in a roster always wins.
SERB_MAJORITY = frozenset({
    "mitrovica-e-veriut", "leposaviq", "zubin-potok", "zvecan",
    "gracanice", "novoberde", "shterpce", "kllokot", "partesh", "ranillug",
})

# Seed: which duty officers carry a (fictitious) phone for SMS. Agencies whose referrals can
# carry a 2-hour deadline (worst forms, trafficking) are the ones worth waking by SMS.
SMS_AGENCIES = frozenset({"police", "prosecution", "csw"})

_SUB = re.compile(r"^[a-z0-9_.\-]{3,200}$")
_EMAIL = re.compile(r"^[^@\s,;<>]+@[^@\s,;<>]+\.[a-z]{2,}$", re.IGNORECASE)
_PHONE = re.compile(r"^\+[1-9][0-9]{7,14}$")
_TRUE = {"true", "yes", "1", "y", "t"}
_FALSE = {"false", "no", "0", "n", "f", ""}


@dataclass(frozen=True, slots=True)
class Officer:
    officer_id: str
    agency: str
    municipality: str
    office_id: str
    role: str
    language: str
    email: str | None = None
    phone: str | None = None
    inapp: bool = True
    on_duty: bool = False

    def as_row(self) -> dict[str, str]:
        d = asdict(self)
        return {k: ("true" if v is True else "false" if v is False else (v or "")) for k, v in d.items()}


def default_language(municipality: str) -> str:
    return "sr" if municipality in SERB_MAJORITY else "sq"


def seed_officers() -> list[Officer]:
    """Every agency office of every municipality: an on-duty officer and a supervisor; every
    municipality a coordinator (`coordinator.<slug>`)."""
    out: list[Officer] = []
    phone_seq = 0
    for office in agency_offices().values():
        lang = default_language(office.municipality)
        if office.agency == AgencyType.coordinator.value:
            sub = f"coordinator.{office.municipality}"
            out.append(Officer(sub, office.agency, office.municipality, office.office_id, "coordinator",
                               lang, email=f"{sub}@example.invalid", inapp=True, on_duty=True))
            continue
        for role, suffix, on_duty in (("duty_officer", "duty", True), ("supervisor", "supervisor", False)):
            sub = f"{office.agency}.{office.municipality}.{suffix}"
            phone = None
            if role == "duty_officer" and office.agency in SMS_AGENCIES:
                phone_seq += 1
                # +383 00 ... is not an allocated Kosovo range: fictitious numbers for development.
                phone = f"+38300{phone_seq:06d}"
            out.append(Officer(sub, office.agency, office.municipality, office.office_id, role, lang,
                               email=f"{sub}@example.invalid", phone=phone, inapp=True, on_duty=on_duty))
    return out


def write_seed(path: Path = SEED_FILE) -> int:
    officers = seed_officers()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for o in officers:
            w.writerow(o.as_row())
    return len(officers)


class RosterError(ValueError):
    """A roster that cannot be imported; `errors` lists 'row N, column C: problem' sentences."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        super().__init__("; ".join(errors[:20]) + more)


def _bool(value: str) -> bool | None:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def parse_roster(text: str) -> list[Officer]:
    """Validate a roster CSV; raise `RosterError` naming the row and the column of every problem.

    Rows are numbered as a spreadsheet shows them: the header is row 1, data starts at row 2."""
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    _check_header([h.strip() for h in (reader.fieldnames or [])])
    known = _Known(offices=agency_offices(), slugs=municipality_slugs(), agencies={a.value for a in AgencyType})
    errors: list[str] = []
    seen: dict[str, int] = {}
    out: list[Officer] = []
    for n, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if None in raw:
            errors.append(f"row {n}: more values than columns in the header")
            continue
        if not any(row.values()):
            continue  # blank line
        officer, row_errors = _parse_row(n, row, seen=seen, known=known)
        if officer is None:
            errors.extend(row_errors)
            continue
        seen[officer.officer_id] = n
        out.append(officer)
    if errors:
        raise RosterError(errors)
    return out


def _check_header(header: list[str]) -> None:
    if not header:
        raise RosterError(["row 1: the file is empty; expected a header row with columns " + ",".join(COLUMNS)])
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in COLUMNS]
    errors: list[str] = []
    if missing:
        errors.append(f"row 1, column {missing[0]}: required column missing (header has {','.join(header)})")
    if unknown:
        errors.append(f"row 1, column {unknown[0]}: unknown column; allowed: {','.join(COLUMNS)}")
    if errors:
        raise RosterError(errors)


@dataclass(frozen=True)
class _Known:
    """The reference data a roster row is checked against."""

    offices: dict
    slugs: set
    agencies: set


def _parse_row(n: int, row: dict[str, str], *, seen: dict[str, int],
               known: _Known) -> tuple[Officer | None, list[str]]:
    """One data row: the officer, or None and the problems of the row (`row N, column C: ...`)."""
    row_errors: list[str] = []

    def bad(col: str, msg: str) -> None:
        row_errors.append(f"row {n}, column {col}: {msg}")

    for col in REQUIRED:
        if not row.get(col):
            bad(col, "required value is empty")
    sub = row.get("officer_id", "")
    if sub and not _SUB.match(sub):
        bad("officer_id", f"{sub!r} must be 3-200 of a-z, 0-9, '.', '_', '-' (the officer's login subject)")
    elif sub in seen:
        bad("officer_id", f"{sub!r} appears twice (first on row {seen[sub]})")
    agency = row.get("agency", "")
    if agency and agency not in known.agencies:
        bad("agency", f"{agency!r} is not one of {', '.join(sorted(known.agencies))}")
    muni = row.get("municipality", "")
    if muni and muni not in known.slugs:
        bad("municipality", f"{muni!r} is not a municipality slug (e.g. prizren, prishtine)")
    office_id = row.get("office_id", "")
    if office_id:
        office = known.offices.get(office_id)
        if office is None:
            bad("office_id", f"{office_id!r} is not a known agency office (e.g. csw.prizren)")
        elif (agency and office.agency != agency) or (muni and office.municipality != muni):
            bad("office_id", f"{office_id!r} is the {office.agency} office of {office.municipality}, "
                             f"not of agency {agency!r} in {muni!r}")
    role = row.get("role", "")
    if role and role not in ROLES:
        bad("role", f"{role!r} is not one of {', '.join(ROLES)}")
    lang = row.get("language", "")
    if lang and lang not in LANGUAGES:
        bad("language", f"{lang!r} is not one of {', '.join(LANGUAGES)}")
    email = row.get("email", "")
    if email and not _EMAIL.match(email):
        bad("email", "not an e-mail address")  # the value itself is personal data: not echoed
    phone = row.get("phone", "").replace(" ", "")
    if phone and not _PHONE.match(phone):
        bad("phone", "not a phone number in E.164 form (e.g. +38344123456)")
    flags = _flags(row, bad)
    if not row_errors and not (email or phone or flags.get("inapp")):
        bad("inapp", "the officer has no channel: give an email, a phone, or inapp=true")
    if row_errors:
        return None, row_errors
    return Officer(sub, agency, muni, office_id, role, lang, email=email or None, phone=phone or None,
                   inapp=flags["inapp"], on_duty=flags["on_duty"]), []


def _flags(row: dict[str, str], bad) -> dict[str, bool]:  # noqa: ANN001 - bad(col, msg)
    """inapp (default true) and on_duty (default false)."""
    flags: dict[str, bool] = {}
    for col, default in (("inapp", True), ("on_duty", False)):
        value = row.get(col)
        if value is None or value == "":
            flags[col] = default
            continue
        parsed = _bool(value)
        if parsed is None:
            bad(col, f"{value!r} is not true/false")
        else:
            flags[col] = parsed
    return flags


def municipality_name(slug: str, language: str) -> str:
    m = municipalities()[slug]
    return {"sq": m.name_sq, "sr": m.name_sr}.get(language, m.name_en)




if __name__ == "__main__":  # python -m services.notifications.directory: regenerate the seed file
    print(f"wrote {write_seed()} officers to {SEED_FILE}")
