"""`clms demo`: realistic synthetic identifications posted to the intake API.

Municipalities are drawn weighted by population; sectors, ages and reporters follow rough
shares of what Kosovo's CLMS records (street work and begging most often, then agriculture and
scrap collection; police and centres for social work report most). Names are invented from
common first and family names, never taken from a real roster.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import httpx

from shared.auth import mint_token
from shared.reference import municipalities
from shared.settings import Settings

SECTORS: list[tuple[str, str, float, bool]] = [  # sector, activity, weight, hazardous
    ("street_work", "street_vending", 22, False),
    ("street_work", "car_washing", 6, False),
    ("begging", "begging", 18, False),
    ("begging", "forced_begging", 3, True),
    ("agriculture", "harvesting", 12, False),
    ("agriculture", "pesticide_handling", 2, True),
    ("scrap_metal_waste", "scrap_collection", 12, True),
    ("scrap_metal_waste", "waste_picking", 5, True),
    ("construction", "building_site_labour", 5, True),
    ("domestic_work", "domestic_service", 4, False),
    ("other", "retail_shop", 5, False),
    ("other", "mechanics_workshop", 2, True),
    ("trafficking", "trafficking_for_labour", 1, True),
    ("illicit_activities", "theft_under_coercion", 1, True),
]
REPORTERS = [("police", 40), ("csw", 25), ("labour_inspectorate", 15), ("education", 15), ("ngo", 5)]
COMMUNITIES = [("albanian", 55), ("roma", 15), ("ashkali", 12), ("egyptian", 8), ("serbian", 4),
               ("bosniak", 2), ("turkish", 2), ("gorani", 1), ("undisclosed", 1)]
SCHOOL = [("dropped_out", 35), ("enrolled_irregular", 30), ("enrolled_attending", 20),
          ("never_enrolled", 10), ("unknown", 5)]
GIVEN = ["Arben", "Blerim", "Dardan", "Egzon", "Florent", "Genc", "Ilir", "Leutrim", "Arta", "Besa",
         "Drita", "Elira", "Fjolla", "Hana", "Lule", "Vjosa", "Milan", "Stefan", "Jelena", "Ana",
         "Senad", "Amra", "Ramadan", "Sabrije"]
FAMILY = ["Krasniqi", "Gashi", "Berisha", "Morina", "Shala", "Hoxha", "Bytyqi", "Kelmendi", "Rama",
          "Ahmeti", "Jovanović", "Petrović", "Nikolić", "Mustafa", "Osmani", "Beqiri"]


def _pick(rng: random.Random, pairs: list[tuple[Any, float]]) -> Any:
    return rng.choices([p[0] for p in pairs], weights=[p[1] for p in pairs])[0]


def synthetic_identification(rng: random.Random, *, today: date | None = None) -> tuple[str, str, dict[str, Any]]:
    """(reporter agency, municipality, request body) for one synthetic identification."""
    today = today or date.today()
    munis = municipalities()
    slugs = sorted(munis)
    muni = rng.choices(slugs, weights=[munis[s].population or 5000 for s in slugs])[0]
    sector, activity, _, hazardous = rng.choices(SECTORS, weights=[s[2] for s in SECTORS])[0]
    reporter = _pick(rng, REPORTERS)
    age = rng.choices(range(5, 18), weights=[1, 2, 3, 4, 5, 6, 7, 8, 8, 8, 7, 6, 5])[0]
    child: dict[str, Any] = {
        "given_name": rng.choice(GIVEN), "family_name": rng.choice(FAMILY),
        "sex": rng.choice(["male", "male", "female"]),
        "community": _pick(rng, COMMUNITIES), "school_status": _pick(rng, SCHOOL),
    }
    if rng.random() < 0.6:
        child["date_of_birth"] = (today - timedelta(days=age * 365 + rng.randint(0, 300))).isoformat()
    else:
        child["estimated_age"] = age
    body = {
        "municipality": muni,
        "identified_on": (today - timedelta(days=rng.randint(0, 20))).isoformat(),
        "report_source": "ngo" if reporter == "ngo" else rng.choice(["officer"] * 9 + ["citizen"]),
        "child": child,
        "work": {"sector": sector, "activity": activity, "hazardous": hazardous,
                 "employer_involved": sector in ("construction", "agriculture", "other") and rng.random() < 0.5},
    }
    return reporter, muni, body


@dataclass
class DemoResult:
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    municipalities: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_demo(settings: Settings, *, base_url: str, rate: float, duration_s: float, seed: int | None,
                   concurrency: int = 32, on_progress=None) -> DemoResult:  # noqa: ANN001
    rng = random.Random(seed)
    result = DemoResult()
    total = max(1, int(rate * duration_s))
    tokens: dict[tuple[str, str], str] = {}
    sem = asyncio.Semaphore(concurrency)

    def token(agency: str, muni: str) -> str:
        if (agency, muni) not in tokens:
            tokens[(agency, muni)] = mint_token(settings, sub=f"{agency}.{muni}.duty", agency=agency,
                                                municipality=muni, roles=["reporter"])
        return tokens[(agency, muni)]

    async with httpx.AsyncClient(base_url=base_url, timeout=15) as client:
        async def one(i: int) -> None:
            agency, muni, body = synthetic_identification(rng)
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/identifications", json=body, headers={
                        "Authorization": f"Bearer {token(agency, muni)}", "Idempotency-Key": f"demo-{seed}-{i}-{time.time_ns()}"})
                    result.statuses[r.status_code] += 1
                    if r.status_code == 201:
                        result.municipalities[muni] += 1
                        result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                except httpx.HTTPError as exc:
                    result.errors[type(exc).__name__] += 1
                result.sent += 1
                if on_progress:
                    on_progress()

        start = time.perf_counter()
        tasks = []
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return result
