"""Pure business rules of intake: vocabularies, age, worst forms, the child_ref pseudonym.

No FastAPI, faust, asyncpg or aiokafka here: everything is unit-tested without I/O.

child_ref
---------
`child_ref = "cr_" + hex(HMAC-SHA256(CHILD_REF_KEY, "v1|<given>|<family>|<birth year>"))`

The identity fields are chosen so that two agencies reporting the same child get the same ref
even when they type the name differently, and so that a field one agency often does not know
does not split the child in two:

- given name and family name, each normalised: Unicode NFKD, combining marks dropped
  ("Krasniqë" = "Krasniqe", "Đorđević" = "Djordjevic" via an explicit map for letters that
  do not decompose: đ->dj, ł->l, ø->o, ß->ss, æ->ae), case folded, and every character that is
  not a letter or digit removed ("Ana-Maria", "ana maria", " ANA  MARIA " are one name);
- the birth year: the year of the date of birth when known, else the year of identification
  minus the estimated age. (A full date of birth would never match an estimate; a year does
  whenever the estimate is right to the year.)

Deliberately NOT part of the ref: sex (often "unknown" for one reporter), municipality (a child
from Prizren begging in Prishtina is one child), community, school status. The consequence is
that two different children with the same normalised names and birth year share a ref: a link
(`linked_case_id`) is therefore a hint for the caseworker, never an automatic merge.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import unicodedata
from datetime import date
from importlib import resources
from typing import TYPE_CHECKING

import yaml

from shared.events import WORST_FORM_SECTORS, AgeBand, AgencyType, Sector

if TYPE_CHECKING:
    from shared.access import Resource

CHILD_REF_VERSION = "v1"
CHILD_REF_PREFIX = "cr_"

MAX_AGE = 17
COMPULSORY_SCHOOL_AGES = range(6, 16)  # 6-15 inclusive (Law 04/L-032 on pre-university education)

# Activities that are worst forms whatever their sector (ILO C182 Art. 3(a): forced begging).
WORST_FORM_ACTIVITIES: frozenset[str] = frozenset({"forced_begging"})

# Letters NFKD does not decompose into a base letter plus a mark.
_SPECIAL = str.maketrans({
    "đ": "dj", "Đ": "dj", "ł": "l", "Ł": "l", "ø": "o", "Ø": "o", "ß": "ss", "æ": "ae", "Æ": "ae",
    "ı": "i", "œ": "oe", "Œ": "oe", "þ": "th",
})
_NOT_ALNUM = re.compile(r"[\W_]+", re.UNICODE)


def normalise_name(value: str) -> str:
    """Spacing, case, hyphens, apostrophes and diacritics do not matter: 'Arbër  Krasniqi' ->
    'arberkrasniqi'."""
    text = unicodedata.normalize("NFKD", value.translate(_SPECIAL))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _NOT_ALNUM.sub("", text.casefold())


def birth_year(*, date_of_birth: date | None, estimated_age: int | None, identified_on: date) -> int:
    if date_of_birth is not None:
        return date_of_birth.year
    if estimated_age is None:
        raise ValueError("child: give date_of_birth or estimated_age")
    return identified_on.year - estimated_age


def child_ref(key: bytes, *, given_name: str, family_name: str, year_of_birth: int) -> str:
    """Keyed HMAC pseudonym of a child (see the module docstring for the fields)."""
    message = "|".join((CHILD_REF_VERSION, normalise_name(given_name), normalise_name(family_name),
                        str(year_of_birth)))
    digest = hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
    return CHILD_REF_PREFIX + digest


def age_on(date_of_birth: date, day: date) -> int:
    """Completed years on `day`."""
    return day.year - date_of_birth.year - ((day.month, day.day) < (date_of_birth.month, date_of_birth.day))


def age_at_identification(*, date_of_birth: date | None, estimated_age: int | None, identified_on: date) -> int:
    if date_of_birth is not None:
        return age_on(date_of_birth, identified_on)
    if estimated_age is None:
        raise ValueError("child: give date_of_birth or estimated_age")
    return estimated_age


def age_band(age: int) -> AgeBand:
    return AgeBand.of(age)


def is_compulsory_school_age(age: int) -> bool:
    return age in COMPULSORY_SCHOOL_AGES


def is_worst_form(sector: Sector, activity: str) -> bool:
    return sector in WORST_FORM_SECTORS or activity in WORST_FORM_ACTIVITIES


@functools.cache
def activities() -> dict[Sector, tuple[str, ...]]:
    """Allowed activity codes per sector, from `activities.yaml`."""
    raw = yaml.safe_load((resources.files("services.intake") / "activities.yaml").read_text(encoding="utf-8"))
    out = {Sector(k): tuple(v) for k, v in raw.items()}
    missing = set(Sector) - set(out)
    if missing:
        raise ValueError(f"activities.yaml lacks sectors {sorted(missing)}")
    return out


def check_activity(sector: Sector, activity: str) -> None:
    """Raise ValueError naming the allowed codes when `activity` does not belong to `sector`."""
    allowed = activities()[sector]
    if activity not in allowed:
        raise ValueError(
            f"unknown activity {activity!r} for sector {sector.value!r}; allowed: {', '.join(allowed)}"
        )


def identifying_agencies() -> frozenset[AgencyType]:
    """Agencies whose officers identify children: those that may hold the `reporter` role in
    the access policy (shared/access_policy.yaml)."""
    from shared.access import policy

    return frozenset(AgencyType(a) for a in policy().roles["reporter"])


def case_resource(*, case_municipality: str, reporter_agency: str, reporter_municipality: str,
                  holders: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
                  **facts: object) -> "Resource":
    """A case as the access policy sees it: its municipality and the offices involved (the
    reporting office and every office holding a referral for it)."""
    from shared.access import Resource

    return Resource(municipality=case_municipality,
                    offices=frozenset({(reporter_agency, reporter_municipality), *holders}),
                    facts=facts)
