"""Analytics live: the SSE stream pushes a changed count within a second of the event reaching
the broker; the dashboard and its map are served; a restarted worker recovers the same numbers
from its changelog, and a new deployment (new app id) rebuilds them from the topics."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import date

import httpx
import pytest

from services.analytics.app import create_app
from services.analytics.rebuild import rebuild
from shared.kafka import make_producer, send_envelope
from shared.reference import municipality_slugs
from shared.topics import Topics
from tests import builders
from tests.apps import scrape, bearer, running, served
from tests.infra import wait_until
from tests.kafka_helpers import consumed_to_the_end, produce

pytestmark = pytest.mark.integration


async def _next_counts(lines) -> dict:
    event = None
    async for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event == "counts":
            return json.loads(line.split(":", 1)[1])
    raise AssertionError("stream ended")


def _prizren(snapshot) -> object:
    return next(m for m in snapshot["municipalities"] if m["slug"] == "prizren")["identified"]


async def test_stream_pushes_a_change_within_a_second_and_dashboard_is_served(env):
    topics = Topics(env.topic_prefix)
    first = [builders.envelope(builders.case_identified(municipality="prizren")) for _ in range(5)]
    await produce(env, topics.case_events, [(e.key, e.to_json_bytes()) for e in first])
    coordinator = bearer(env, sub="coordinator.prizren", agency="coordinator", municipality="prizren",
                         roles=["coordinator"])["Authorization"].removeprefix("Bearer ")

    app = create_app(env)
    async with running(app) as client:
        await wait_until(lambda: app.state.deps.aggregate.version and sum(
            n for k, n in app.state.deps.aggregate.counts.items() if k[:2] == ("id", "prizren") and k[3] == "total") == 5,
            timeout_s=45, what="the first five identifications")

        # --- dashboard and map
        r = await client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "geoBoundaries" in r.text and "CC BY-SA 2.0" in r.text and "OpenStreetMap contributors" in r.text
        assert "/static/app.js" in r.text
        r = await client.get("/static/app.js")
        assert r.status_code == 200 and "EventSource" in r.text
        r = await client.get("/static/kosovo_municipalities.geojson")
        geo = r.json()
        assert {f["properties"]["slug"] for f in geo["features"]} == set(municipality_slugs())
        assert len(r.content) < 400_000  # simplified for the browser

        producer = make_producer(env)
        await producer.start()
        try:
            async with served(app) as base, httpx.AsyncClient(timeout=10) as http:
                # a browser's EventSource cannot send headers: it buys a one-time ticket first
                ticket = (await http.post(f"{base}/v1/stream/ticket",
                                          headers={"Authorization": f"Bearer {coordinator}"})).json()
                assert ticket["expires_in"] <= 30 and ticket["url"].startswith("/v1/stream?ticket=")
                async with http.stream("GET", f"{base}/v1/stream") as public, \
                        http.stream("GET", f"{base}{ticket['url']}") as coord:
                    assert public.headers["content-type"].startswith("text/event-stream")
                    pub_lines, coord_lines = public.aiter_lines(), coord.aiter_lines()
                    # the public stream starts with the published snapshot (the same as the API's)
                    snap = await _next_counts(pub_lines)
                    assert len(snap["municipalities"]) == 38 and snap["as_of"]
                    rest = (await client.get("/v1/counts/municipalities")).json()
                    assert snap["municipalities"] == rest["municipalities"]
                    assert _prizren(await _next_counts(coord_lines)) == 5

                    # a sixth identification: pushed live to the prizren coordinator within a second
                    # (the public stream waits for the next publication: test_analytics_disclosure_attack)
                    await send_envelope(producer, topics.case_events,
                                        builders.envelope(builders.case_identified(municipality="prizren")))
                    sent_at = time.monotonic()
                    snap = await asyncio.wait_for(_next_counts(coord_lines), 5)
                    latency = time.monotonic() - sent_at
                    assert _prizren(snap) == 6
                    print(f"SSE latency {latency:.3f}s")
                    assert latency < 1.0, f"change pushed after {latency:.2f}s"

                    # gjilan 0 -> 1: folded (a national coordinator sees it exactly)
                    await send_envelope(producer, topics.case_events,
                                        builders.envelope(builders.case_identified(municipality="gjilan")))
        finally:
            await producer.stop()
        await wait_until(lambda: app.state.deps.aggregate.counts.get(
            ("id", "gjilan", date.today().strftime("%Y-%m"), "total", "")) == 1, timeout_s=20, what="gjilan folded")
        totals = (await client.get("/v1/funnel", headers=bearer(
            env, sub="c", agency="coordinator", municipality="*", roles=["coordinator"]))).json()["stages"]

    # --- restart with the same app id: the table comes back from its changelog
    app2 = create_app(env)
    async with running(app2) as client:
        await wait_until(lambda: app2.state.deps.aggregate.counts.get(
            ("id", "gjilan", date.today().strftime("%Y-%m"), "total", "")) == 1,
            timeout_s=45, what="the restarted worker to recover its table")
        national = bearer(env, sub="c", agency="coordinator", municipality="*", roles=["coordinator"])
        assert (await client.get("/v1/funnel", headers=national)).json()["stages"] == totals

    # --- a new deployment (new app id) rebuilds from the beginning of the topics
    rebuilt_env = env.model_copy(update={"analytics_app_id": "analytics-rebuild"})
    app3 = create_app(rebuilt_env)
    async with running(app3) as client:
        await wait_until(lambda: sum(n for k, n in app3.state.deps.aggregate.counts.items()
                                     if k[0] == "id" and k[3] == "total") == 7,
                         timeout_s=45, what="the new deployment to rebuild all tables")
        assert (await client.get("/v1/funnel", headers=national)).json()["stages"] == totals

    # --- the fast rebuild tool (outside faust) prepares another new deployment: the app recovers
    # the table from the changelog it wrote and starts at the committed offsets
    result = await rebuild(env, app_id="analytics-fast")
    assert result.cases == 7 and result.applied == 7
    with pytest.raises(SystemExit):
        await rebuild(env, app_id="analytics-fast")  # that deployment exists now
    fast_env = env.model_copy(update={"analytics_app_id": "analytics-fast"})
    app4 = create_app(fast_env)
    async with running(app4) as client:
        await wait_until(lambda: app4.state.deps.aggregate.version and sum(
            n for k, n in app4.state.deps.aggregate.counts.items() if k[0] == "id" and k[3] == "total") == 7,
            timeout_s=45, what="the fast-rebuilt deployment to recover its table")
        assert (await client.get("/v1/funnel", headers=national)).json()["stages"] == totals
        async def consumed() -> bool:  # the agent is at the end of the topic: it had its chance to re-fold
            return await consumed_to_the_end(fast_env, topics.case_events, "analytics")
        await wait_until(consumed, timeout_s=30, what="the fast-rebuilt deployment's agent to reach the end")
        metrics = await scrape(app4)
        assert "analytics_events_applied_total{" not in metrics  # nothing re-folded by the agent
        assert "analytics_events_duplicate_total 0.0" in metrics



async def test_rebuild_in_two_shares_writes_the_same_changelog_as_one_run(env):
    """Two operators (or pods) can each rebuild a share of the partitions: together they write
    exactly the changelog one run writes, and each commits only its share's offsets."""
    from services.analytics.rebuild import END_MARKER, changelog_topic
    from tests.kafka_helpers import read_all

    topics = Topics(env.topic_prefix)
    cases = [builders.case_identified(municipality=m) for m in ("prizren", "gjilan", "peje") * 8]
    await produce(env, topics.case_events, [(e.key, e.to_json_bytes()) for e in map(builders.envelope, cases)])

    whole = await rebuild(env, app_id="analytics-whole")
    first = await rebuild(env, app_id="analytics-shared", partitions=[0, 1, 2])
    second = await rebuild(env, app_id="analytics-shared", partitions=[3, 4, 5])
    assert whole.cases == first.cases + second.cases == 24
    assert 0 < first.cases < 24  # 24 random case ids: both shares hold some
    with pytest.raises(SystemExit):  # the share is taken now
        await rebuild(env, app_id="analytics-shared", partitions=[0, 1, 2])

    def table(records) -> set:
        return {(r.partition, r.key, r.value) for r in records if r.key != END_MARKER}

    one = table(await read_all(env, changelog_topic(env, "analytics-whole"), min_count=30))
    two = table(await read_all(env, changelog_topic(env, "analytics-shared"), min_count=30))
    assert len(one) == 24 and one == two
