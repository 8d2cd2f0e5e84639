"""Analytics scales out: two `python -m services.analytics` processes in one consumer group
split the partitions, and each answers every API question (exact counts, funnel, time to
acknowledge, the published public view) exactly as one worker holding every case answers on the
same events; when one of them stops, the other takes its partitions over and still answers the
same, new events included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from services.analytics.app import create_app
from shared import events as ev
from shared.embedded import free_port
from shared.settings import Settings
from shared.topics import Topics
from tests import builders
from tests.apps import bearer, running
from tests.infra import wait_until
from tests.kafka_helpers import produce

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MUNIS = ("prizren", "gjilan", "peje", "ferizaj", "decan", "prishtine")
PUBLISH_EVERY_S = "2"  # the public snapshot every 2 s (aligned), so both sides publish the same one


def _case(i: int) -> dict[str, list[ev.Envelope]]:
    """A case's events per topic kind: identified; most referred; some acknowledged, accepted,
    overdue; a notification."""
    muni = MUNIS[i % len(MUNIS)]
    ident = builders.case_identified(municipality=muni, hazardous=i % 3 == 0)
    cid, rid = ident.case_id, uuid.uuid4()
    t0 = datetime.now(timezone.utc) - timedelta(hours=2)
    ref = dict(referral_id=rid, case_id=cid, municipality=muni, agency=ev.AgencyType.csw, office_id=f"csw.{muni}")
    wrap = lambda d, t=None: ev.Envelope.wrap(d, source="test", subject=cid, time=t)  # noqa: E731
    out: dict[str, list[ev.Envelope]] = {"case": [wrap(ident)], "referral": [], "notification": []}
    if i % 4 != 3:
        out["referral"].append(wrap(ev.ReferralCreated(
            **ref, rule_id="csw-every-child", rule_version=1, priority="high", deadline=t0 + timedelta(hours=24),
            legal_basis="x", age_band=ident.age_band, sector=ident.sector, reported_by="police.x.duty"), t0))
        acted = dict(actor=f"csw.{muni}.duty", from_status=ev.ReferralStatus.pending,
                     to_status=ev.ReferralStatus.acknowledged)
        if i % 2 == 0:
            out["referral"].append(wrap(ev.ReferralAcknowledged(**ref, **acted, within_deadline=True),
                                        t0 + timedelta(seconds=60 * (i + 1))))
        elif i % 5 == 0:
            out["referral"].append(wrap(ev.ReferralOverdue(**ref, deadline=t0, status=ev.ReferralStatus.pending)))
        out["notification"].append(wrap(ev.NotificationSent(
            notification_id=uuid.uuid4(), referral_id=rid, case_id=cid, recipient=f"csw.{muni}.duty",
            channel=ev.Channel.email, cause_event_type="referral.created", attempt=1)))
    return out


async def _publish_cases(env: Settings, cases: range) -> None:
    topics = Topics(env.topic_prefix)
    names = {"case": topics.case_events, "referral": topics.referral_events,
             "notification": topics.notification_events}
    made = [_case(i) for i in cases]
    for kind, topic in names.items():
        items = [(e.key, e.to_json_bytes()) for case in made for e in case[kind]]
        await produce(env, topic, items + items[:3])  # three redelivered: counted once


def _worker_process(env: Settings, app_id: str, log_path: Path) -> tuple[subprocess.Popen, str, str]:
    port, metrics = free_port(), free_port()
    proc_env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": env.kafka_bootstrap_servers,
                "CLMS_TOPIC_PREFIX": env.topic_prefix, "CLMS_ENV": "test",
                "CLMS_BROKER_KIND": env.kafka_broker_kind,
                "KAFKA_REBALANCE_TIMEOUT_S": "2", "KAFKA_SESSION_TIMEOUT_S": "6", "LOG_JSON": "false",
                "ANALYTICS_APP_ID": app_id, "ANALYTICS_PORT": str(port), "ANALYTICS_METRICS_PORT": str(metrics),
                "ANALYTICS_PUBLISH_EVERY_S": PUBLISH_EVERY_S, "ANALYTICS_PUBLISH_LAG_S": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "services.analytics"], cwd=ROOT, env=proc_env,
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}/metrics"


async def _answers(client: httpx.AsyncClient, base: str, national: dict) -> dict:
    """Every API answer a user relies on, as a national coordinator and as the public."""
    paths = ["/v1/counts/municipalities", "/v1/funnel", "/v1/counts/municipalities/prizren",
             "/v1/time-to-acknowledge", "/v1/funnel?municipality=gjilan"]
    out = {}
    for path in paths:
        r = await client.get(base + path, headers=national)
        assert r.status_code == 200, (path, r.status_code, r.text)
        out[path] = r.json()
    public = (await client.get(base + "/v1/counts/municipalities")).json()
    out["public"] = public["municipalities"]
    out["public funnel"] = (await client.get(base + "/v1/funnel")).json()["stages"]
    return out


async def _cases_held(client: httpx.AsyncClient, metrics_url: str) -> int:
    text = (await client.get(metrics_url)).text
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("analytics_cases "))))


async def test_two_workers_split_the_partitions_and_answer_as_one(env, tmp_path):
    env = env.model_copy(update={"analytics_publish_every_s": float(PUBLISH_EVERY_S), "analytics_publish_lag_s": 0.0,
                                 "analytics_app_id": "analytics-one"})
    national = bearer(env, sub="c", agency="coordinator", municipality="*", roles=["coordinator"])
    await _publish_cases(env, range(0, 48))
    workers = [_worker_process(env, "analytics-pair", tmp_path / f"worker{n}.log") for n in (1, 2)]
    one = create_app(env)  # the reference: one worker holding every case
    try:
        async with running(one) as single, httpx.AsyncClient(timeout=10) as http:
            async def identified(base: str | None) -> int:
                try:
                    r = await (single.get("/v1/funnel", headers=national) if base is None
                               else http.get(base + "/v1/funnel", headers=national))
                except httpx.HTTPError:
                    return -1
                return r.json()["stages"][0]["count"] if r.status_code == 200 else -1

            why: list[str] = [""]  # what the last check saw, for the failure message

            async def same_as_one(expected_identified: int) -> bool:
                if (n := await identified(None)) != expected_identified:
                    why[0] = f"the reference worker counts {n} identified"
                    return False
                reference = await _answers(single, "", national)
                for _, base, _ in workers:
                    if (n := await identified(base)) != expected_identified:
                        why[0] = f"the worker at {base} counts {n} identified"
                        return False
                    answers = await _answers(http, base, national)
                    if answers != reference:
                        why[0] = f"the worker at {base} answers differently: " + ", ".join(
                            f"{k}: {answers.get(k)} (one worker: {reference[k]})"
                            for k in reference if answers.get(k) != reference[k])
                        return False
                return True

            await wait_until(lambda: same_as_one(48), timeout_s=120, what="both workers to answer as one worker", interval_s=0.5)
            held: list[int] = []

            async def split(total: int) -> bool:
                # a rebalance may still be settling (a worker recovering its partitions holds none
                # yet while the partials it published earlier still answer): wait for the split
                held[:] = [await _cases_held(http, m) for _, _, m in workers]
                return sum(held) == total and min(held) > 0

            await wait_until(lambda: split(48), timeout_s=60, interval_s=0.5,
                             what="the two workers to hold the 48 cases between them, each some")
            # a worker counts the cases of the partitions it recovered at once, and publishes their
            # partial right after; each worker's API answers from the partials it has read since
            await wait_until(lambda: same_as_one(48), timeout_s=30, interval_s=0.2,
                             what="both workers to answer as one worker again once the partitions settled")

            # one worker stops: the other takes its partitions over, and new events still count
            workers[0][0].send_signal(signal.SIGTERM)
            workers[0][0].wait(30)
            await _publish_cases(env, range(48, 60))
            workers = workers[1:]
            try:
                await wait_until(lambda: same_as_one(60), timeout_s=120,
                                 what="the remaining worker to take over and answer as one worker", interval_s=0.5)
            except AssertionError as exc:
                from shared.kafka import group_lag
                lag = [f"{r.topic.rsplit('.', 1)[-1]}[{r.partition}] {r.committed}/{r.end}"
                       for r in await group_lag(env, {env.group_id("analytics-pair")}) if r.lag]
                raise AssertionError(f"{exc}; last seen: {why[0]}; the pair's group behind on: {lag}") from None
            await wait_until(lambda: split(60), timeout_s=60, interval_s=0.5,
                             what="the remaining worker to hold all 60 cases")
    finally:
        for proc, _, _ in workers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
