"""The production access model on a real broker: Apache Kafka with SASL/SCRAM-SHA-512 and the
standard authorizer, the service principals and ACLs created by the generated
`deploy/kafka/init-security.sh` (from `deploy/kafka/access.yaml`), and every service running as
its own principal. The Prizren case goes through end to end; a service writing a topic it does
not own is refused by the broker."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

import asyncpg
import httpx
import pytest
from aiokafka.errors import TopicAuthorizationFailedError

from shared.embedded import free_port
from shared.kafka import ensure_topics, make_producer
from shared.kafka_broker import EmbeddedKafka
from shared.settings import Settings
from shared.topics import Topics
from tests.e2e.harness import running_system
from tests.e2e.test_prizren_case import identification, officer, referrals_of
from tests.infra import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("intake", "referral", "notifications", "analytics")


@pytest.fixture(scope="module")
def secured_broker(infra):
    if infra.is_tansu:
        pytest.skip("the secured profile needs Apache Kafka (Tansu has no SASL or ACLs)")
    folder = Path(tempfile.mkdtemp(prefix="clms-secured-"))
    broker = EmbeddedKafka(free_port(), folder, secured=True, admin_password=secrets.token_urlsafe(16)).start()
    passwords = {name: secrets.token_urlsafe(16) for name in SERVICES}
    out = broker.apply_security(ROOT / "deploy/kafka/init-security.sh", passwords)
    assert "users and ACLs applied" in out, out
    try:
        yield broker, passwords
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def principal_env(broker: EmbeddedKafka, user: str, password: str) -> dict[str, str]:
    return {**broker.admin_env(), "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": password}


def settings_as(broker: EmbeddedKafka, user: str, password: str) -> Settings:
    return Settings(_env_file=None, CLMS_ENV="test", **principal_env(broker, user, password))  # type: ignore[arg-type]


async def test_every_service_works_with_exactly_its_acls(secured_broker, tmp_path):
    broker, passwords = secured_broker
    admin = settings_as(broker, "admin", broker.admin_password)
    await ensure_topics(admin)  # the topic-init job's part, as the super user
    service_env = {name: principal_env(broker, name, pw) for name, pw in passwords.items()}
    async with running_system(tmp_path / "sys", extra_env=broker.admin_env(), service_env=service_env) as system:
        async with httpx.AsyncClient(timeout=20) as client:
            police = officer(system, "police", "prizren", role="reporter")
            r = await client.post(f"{system.url('intake')}/v1/identifications", json=identification("prizren"),
                                  headers=police)
            assert r.status_code == 201, r.text
            case_id = r.json()["case_id"]

            csw = officer(system, "csw", "prizren")

            async def referred():
                items = await referrals_of(client, system, municipality="prizren", case_id=case_id)
                agencies = sorted(i["agency"] for i in items)
                return agencies if {"csw", "education"} <= set(agencies) else None
            agencies = await wait_until(referred, timeout_s=90, what="referrals to csw and education of Prizren")

            async def alerted():
                r = await client.get(f"{system.url('notifications')}/v1/inbox", headers=csw)
                return r.status_code == 200 and any(a.get("case_id") == case_id for a in r.json()["items"])
            await wait_until(alerted, timeout_s=90, what="the CSW duty officer's inbox alert")

            async def counted():
                r = await client.get(f"{system.url('analytics')}/v1/counts/municipalities/prizren",
                                     headers=system.headers(sub="coordinator.prizren", agency="coordinator",
                                                            municipality="prizren", roles=["coordinator"]))
                return r.status_code == 200 and r.json()["identified"] >= 1
            await wait_until(counted, timeout_s=90, what="analytics to count the case")

        for name in SERVICES:
            log = system.log(name)
            assert "TopicAuthorizationFailed" not in log and "GroupAuthorizationFailed" not in log, \
                f"{name} was refused by the broker:\n{log[-3000:]}"
        conn = await asyncpg.connect(system.settings.database_url)
        try:
            assert await conn.fetchval("select count(*) from referral.referral where case_id = $1", case_id) \
                == len(agencies)
        finally:
            await conn.close()
    print(f"\n[e2e] secured profile (SASL/SCRAM-SHA-512, ACLs from deploy/kafka): Prizren case referred to "
          f"{agencies}, alerted and counted, every service as its own principal")


async def test_a_service_writing_a_topic_it_does_not_own_is_refused(secured_broker):
    broker, passwords = secured_broker
    await ensure_topics(settings_as(broker, "admin", broker.admin_password))
    producer = make_producer(settings_as(broker, "notifications", passwords["notifications"]),
                             request_timeout_ms=10000)
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(Topics("").case_events, b'{"forged": true}', key=b"x")
    finally:
        await producer.stop()
