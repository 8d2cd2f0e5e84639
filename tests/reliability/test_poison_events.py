"""Poison events (invalid JSON, unknown type, a payload that breaks the contract) on every
consumed topic: each lands in clms.dead-letters with topic, partition, offset, consumer group and
reason, once per consuming service; the events behind them are processed; `clms dlq replay`
re-publishes a fixed event, which then goes through."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest

from clms.ops import dead_letters
from shared.inbound import dev_sender_key, sign_event
from shared.topics import Topic, Topics
from tests import builders
from tests.e2e.harness import running_system
from tests.infra import wait_until
from tests.kafka_helpers import produce

pytestmark = pytest.mark.reliability

def _identification(municipality: str) -> dict:
    from datetime import date

    return {"municipality": municipality, "identified_on": date.today().isoformat(),
            "child": {"given_name": "Replaytest", "family_name": "Fixedaj", "estimated_age": 11, "sex": "male"},
            "work": {"sector": "begging", "activity": "begging"}}


CONSUMERS = {  # topic -> services whose consumers read it
    Topic.agency_inbound: {"intake"},
    Topic.case_events: {"referral", "analytics"},
    Topic.referral_events: {"intake", "notifications", "analytics"},
    Topic.notification_events: {"analytics"},
}


def unknown_of() -> dict:
    unknown = builders.envelope().to_dict()
    unknown["type"] = "case.teleported"
    return unknown


def poisons(topic: Topic) -> list[tuple[str, bytes]]:
    contract_breaking = builders.envelope().to_dict()
    contract_breaking["data"]["age_band"] = "ancient"
    if topic is Topic.agency_inbound:  # signed by its office, as agency systems publish
        contract_breaking = {"specversion": "1.0", "id": "bad-1", "source": "police/prizren",
                             "type": "identification.submitted", "data": {"municipality": "atlantis"}}
        return [("invalid_json", b"{this is not json"), ("unknown_type", orjson.dumps(unknown_of())),
                ("invalid", sign_event(contract_breaking, dev_sender_key("police/prizren")))]
    unknown = builders.envelope().to_dict()
    unknown["type"] = "case.teleported"
    return [("invalid_json", b"{this is not json"), ("unknown_type", orjson.dumps(unknown)),
            ("invalid", orjson.dumps(contract_breaking))]


async def test_poison_events_are_dead_lettered_and_the_stream_moves_on(tmp_path):
    async with running_system(tmp_path / "sys") as system:
        settings = system.settings
        topics = Topics(settings.topic_prefix)
        for topic in CONSUMERS:
            await produce(settings, topics.name(topic), [(b"poison", v) for _, v in poisons(topic)])

        # a good case behind the poison on case-events is still routed
        good = builders.case_identified(municipality="peje")
        good_env = builders.envelope(good)
        await produce(settings, topics.case_events, [(good_env.key, good_env.to_json_bytes())])

        expected = sum(3 * len(groups) for groups in CONSUMERS.values())

        async def all_dead_lettered():
            letters = await dead_letters(settings)
            return letters if len(letters) >= expected else None
        letters = await wait_until(all_dead_lettered, timeout_s=60, what=f"{expected} dead letters", interval_s=0.5)
        assert len(letters) == expected, [(d.letter.topic, d.letter.group, d.letter.reason) for d in letters]

        per = Counter()
        for d in letters:
            assert d.letter.partition >= 0 and d.letter.offset >= 0 and d.letter.error
            service = next(s for s in ("intake", "referral", "notifications", "analytics") if s in d.letter.group)
            per[(d.letter.topic, service)] += 1
        for topic, services in CONSUMERS.items():
            for service in services:
                assert per[(topics.name(topic), service)] == 3, (topic, service, per)
        reasons = Counter(d.letter.reason for d in letters)
        assert reasons["invalid_json"] == len([s for g in CONSUMERS.values() for s in g])
        inbound = [d for d in letters if d.letter.topic == topics.agency_inbound]
        assert all(b"atlantis" not in (d.letter.value or b"") for d in inbound), "inbound bytes are not copied"

        coordinator = system.headers(sub="coordinator.peje", agency="coordinator", municipality="peje",
                                     roles=["coordinator"])
        async with httpx.AsyncClient(timeout=20) as client:
            async def routed(case_id: str):
                r = await client.get(f"{system.url('referral')}/v1/referrals",
                                     params={"case_id": case_id, "municipality": "peje"}, headers=coordinator)
                return r.json()["items"]
            await wait_until(lambda: routed(str(good.case_id)), timeout_s=30, what="the good event behind the poison")

            # fix the contract-breaking case event and replay it with the operator command
            broken = next(d for d in letters if d.letter.topic == topics.case_events and d.letter.reason not in
                          ("invalid_json", "unknown_type") and "referral" in d.letter.group)
            fixed = json.loads(broken.letter.value)
            fixed["data"]["age_band"] = "10_14"
            fixed["data"]["municipality"] = "peje"
            fixed_file = tmp_path / "fixed.json"
            fixed_file.write_text(json.dumps(fixed))
            env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers, "DATABASE_URL": settings.database_url,
                   "CLMS_TOPIC_PREFIX": settings.topic_prefix, "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
            clms = str(Path(sys.executable).with_name("clms"))
            listed = subprocess.run([clms, "dlq", "list"], env=env, capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0 and "invalid_json" in listed.stdout, listed.stdout + listed.stderr
            out = subprocess.run([clms, "dlq", "replay", "--id", broken.id, "--fixed", str(fixed_file)],
                                 env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "replayed 1" in out.stdout, out.stdout + out.stderr
            await wait_until(lambda: routed(fixed["subject"]), timeout_s=30, what="the replayed fixed event to be routed")

            # an inbound identification is not copied to the dead-letter topic: replay re-publishes the
            # original, signed as its office sent it, from the inbound topic (it fails again: its data is bad)
            inbound_letter = next(d for d in inbound if d.letter.reason == "invalid_identification")
            plain = subprocess.run([clms, "dlq", "replay", "--id", inbound_letter.id], env=env,
                                   capture_output=True, text=True, timeout=60)
            assert plain.returncode == 0 and "replayed 1 as os:" in plain.stdout, plain.stdout + plain.stderr
            # an operator cannot vouch for an agency: an unsigned correction is refused ...
            corrected = {"specversion": "1.0", "id": "bad-1-fixed", "source": "police/prizren",
                         "type": "identification.submitted", "data": _identification("peje")}
            fixed_file.write_text(json.dumps(corrected))
            out = subprocess.run([clms, "dlq", "replay", "--id", inbound_letter.id, "--fixed", str(fixed_file),
                                  "--force"], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode != 0 and "signed by the agency office" in out.stderr, out.stdout + out.stderr
            # ... the office's re-signed (and encrypted) correction goes through
            from services.intake.inbound import public_key
            from shared.inbound import inbound_message

            fixed_file.write_bytes(inbound_message(corrected, recipient=public_key(settings)))
            out = subprocess.run([clms, "dlq", "replay", "--id", inbound_letter.id, "--fixed", str(fixed_file),
                                  "--force"], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "replayed 1" in out.stdout, out.stdout + out.stderr
            import uuid as _uuid
            case_id = _uuid.uuid5(_uuid.uuid5(_uuid.NAMESPACE_URL, "clms-inbound:police/prizren:bad-1-fixed"), "case")
            await wait_until(lambda: routed(str(case_id)), timeout_s=30, what="the corrected inbound identification")
        print(f"\n[reliability] {len(letters)} dead letters: {dict(reasons)}; good and replayed events processed")
