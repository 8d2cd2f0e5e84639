"""The event contract: round trips, field-naming rejections, and no personal data in payloads."""

from __future__ import annotations

import re
import typing
import uuid

import orjson
import pytest
from pydantic import BaseModel

from shared import events as ev
from tests import builders


@pytest.mark.parametrize("data", builders.one_of_each(), ids=lambda d: type(d).event_type)
def test_every_event_type_round_trips_through_json(data):
    env = builders.envelope(data)
    raw = env.to_json_bytes()
    back = ev.parse_envelope(raw)
    assert back == env
    assert type(back.data) is type(data)
    assert back.type == type(data).event_type
    assert back.dataschema == f"urn:clms:events:{back.type}:v{ev.SCHEMA_VERSION}"


def test_envelope_carries_cloudevents_attributes_and_case_key():
    data = builders.case_identified()
    env = ev.Envelope.wrap(data, source="police/prizren", subject=data.case_id)
    d = orjson.loads(env.to_json_bytes())
    for attr in ("specversion", "id", "source", "type", "subject", "time", "datacontenttype",
                 "dataschema", "correlationid", "data"):
        assert attr in d
    assert d["specversion"] == "1.0"
    assert env.key == str(data.case_id).encode()
    follow = env.follow(builders.one_of_each()[5], source="referral")
    assert follow.correlationid == env.correlationid and follow.causationid == str(env.id)


def test_events_are_frozen():
    env = builders.envelope()
    with pytest.raises(Exception):
        env.type = "case.closed"  # type: ignore[misc]
    with pytest.raises(Exception):
        env.data.municipality = "peje"  # type: ignore[misc]


def _raw(**changes):
    d = builders.envelope().to_dict()
    for path, value in changes.items():
        target = d
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[k]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return orjson.dumps(d)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"data__municipality": "atlantis"}, "data.municipality"),
        ({"data__child_ref": KeyError}, "data.child_ref"),
        ({"data__sector": "mining_on_mars"}, "data.sector"),
        ({"data__hazardous": "perhaps"}, "data.hazardous"),
        ({"id": "not-a-uuid"}, "id"),
        ({"time": "2026-01-01T10:00:00"}, "time"),
        ({"subject": KeyError}, "subject"),
        ({"specversion": "0.3"}, "specversion"),
        ({"type": "case.exploded"}, "type"),
        ({"data__child_name": "Arben"}, "data.child_name"),
    ],
)
def test_a_wrong_or_missing_field_is_rejected_with_its_name(changes, field):
    with pytest.raises(ev.EnvelopeError) as info:
        ev.parse_envelope(_raw(**changes))
    assert info.value.reason.startswith(field) or f"; {field}" in info.value.reason, info.value.reason


def test_invalid_json_is_rejected_as_such():
    with pytest.raises(ev.EnvelopeError, match="invalid JSON"):
        ev.parse_envelope(b"{not json")


PII_PATTERN = re.compile(
    r"(^|_)(name|names|given|family|surname|first_name|last_name|birth|dob|born|address|street|"
    r"phone|mobile|tel|email|guardian|parent|contact|notes?|comment|description|free_text)($|_)"
)
ALLOWED = {"office_id", "legal_basis"}


def _fields(model: type[BaseModel], seen: set) -> typing.Iterator[tuple[str, str]]:
    if model in seen:
        return
    seen.add(model)
    for name, f in model.model_fields.items():
        yield model.__name__, name
        for arg in typing.get_args(f.annotation) or (f.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield from _fields(arg, seen)


def test_no_payload_field_looks_like_personal_data():
    offenders = []
    seen: set = set()
    for model in [ev.Envelope, *ev.EVENT_TYPES.values()]:
        for owner, name in _fields(model, seen):
            if name not in ALLOWED and PII_PATTERN.search(name):
                offenders.append(f"{owner}.{name}")
    assert offenders == [], f"fields that look like personal data on a topic: {offenders}"


def test_the_pii_check_itself_catches_a_name_field():
    class Leaky(ev.EventData):
        child_given_name: str

    assert any(PII_PATTERN.search(n) for _, n in _fields(Leaky, set()))


def test_activity_is_a_code_not_free_text():
    with pytest.raises(Exception):
        builders.case_identified(activity="Arben collects metal behind Rruga e Shkronjave 12")


def test_age_band_boundaries():
    assert ev.AgeBand.of(0) is ev.AgeBand.under_10
    assert ev.AgeBand.of(9) is ev.AgeBand.under_10
    assert ev.AgeBand.of(10) is ev.AgeBand.from_10_to_14
    assert ev.AgeBand.of(14) is ev.AgeBand.from_10_to_14
    assert ev.AgeBand.of(15) is ev.AgeBand.from_15_to_17
    assert ev.AgeBand.of(17) is ev.AgeBand.from_15_to_17


def test_data_of_another_type_is_rejected():
    data = builders.one_of_each()[1]  # case.updated
    with pytest.raises(Exception, match="cannot be the data"):
        ev.Envelope(type="case.identified", source="x", subject=str(uuid.uuid4()),
                    dataschema="x", correlationid="c", data=data)
