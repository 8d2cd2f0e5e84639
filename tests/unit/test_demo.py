"""Synthetic identifications are valid requests, spread by population, reproducible by seed."""

from __future__ import annotations

import random
from collections import Counter

from clms.demo import synthetic_identification
from shared.reference import municipalities


def test_synthetic_identifications_are_reproducible_and_weighted_by_population():
    a = [synthetic_identification(random.Random(7)) for _ in range(3)]
    b = [synthetic_identification(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    counts = Counter(synthetic_identification(rng)[1] for _ in range(4000))
    assert set(counts) <= set(municipalities())
    assert counts["prishtine"] > counts["partesh"] * 5


def test_synthetic_identifications_validate_as_intake_requests():
    import pytest

    models = pytest.importorskip("services.intake.models")
    rng = random.Random(3)
    for _ in range(300):
        _, _, body = synthetic_identification(rng)
        models.IdentificationRequest.model_validate(body)
