"""Reference data shipped with the product (copied from ../shared/reference, never read from there).

Loaded lazily from package files and cached: importing this module does no I/O.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

REFERENCE_DIR = Path(str(resources.files("shared") / "reference"))


@dataclass(frozen=True, slots=True)
class Municipality:
    code: str
    slug: str
    name_sq: str
    name_sr: str
    name_en: str
    district: str
    population_2011: int | None
    population_2024: int | None

    @property
    def population(self) -> int | None:
        """Best known resident population (2024 census, else 2011)."""
        return self.population_2024 or self.population_2011


@dataclass(frozen=True, slots=True)
class AgencyOffice:
    office_id: str
    agency: str
    municipality: str
    district: str
    name_en: str
    name_sq: str


def _rows(name: str) -> list[dict[str, str]]:
    with open(REFERENCE_DIR / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@functools.cache
def municipalities() -> dict[str, Municipality]:
    """The 38 municipalities keyed by slug, in the Kosovo Agency of Statistics order."""
    pop2024 = {r["code"]: r["population_2024"] for r in _rows("municipalities_population_2024.csv")}
    out: dict[str, Municipality] = {}
    for r in _rows("municipalities.csv"):
        p24 = pop2024.get(r["code"]) or ""
        out[r["slug"]] = Municipality(
            code=r["code"],
            slug=r["slug"],
            name_sq=r["name_sq"],
            name_sr=r["name_sr"],
            name_en=r["name_en"],
            district=r["district"],
            population_2011=int(r["population_2011"]) if r["population_2011"].strip() else None,
            population_2024=int(p24) if p24.strip().isdigit() else None,
        )
    return out


@functools.cache
def municipality_slugs() -> frozenset[str]:
    return frozenset(municipalities())


@functools.cache
def agency_offices() -> dict[str, AgencyOffice]:
    """Agency directory: which office of which agency type serves which municipality."""
    return {r["office_id"]: AgencyOffice(**r) for r in _rows("agency_offices.csv")}


@functools.cache
def _office_index() -> dict[tuple[str, str], AgencyOffice]:
    return {(o.agency, o.municipality): o for o in agency_offices().values()}


def office_serving(agency: str, municipality: str) -> AgencyOffice:
    """The office of `agency` that serves `municipality`; KeyError naming both if none."""
    try:
        return _office_index()[(agency, municipality)]
    except KeyError:
        raise KeyError(f"no {agency} office serves municipality {municipality!r}") from None
