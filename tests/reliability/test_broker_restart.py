"""Apache Kafka killed with SIGKILL under a steady load of identifications and restarted on the
same log directory: every accepted identification is referred and alerted exactly once, and every
service comes back to ready by itself.

The load generator keeps sending while the broker is down (it runs on the event loop; nothing
in it blocks): intake accepts identifications into PostgreSQL and its outbox holds them until the
broker is back. On Tansu (memory only, nothing survives a restart) the test is skipped."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import pytest

from clms.demo import synthetic_identification
from shared.kafka_broker import EmbeddedKafka
from tests.e2e.harness import running_system
from tests.infra import wait_until
from tests.reliability.exactly_once import all_ready, assert_referred_and_alerted_exactly_once

pytestmark = pytest.mark.reliability

RATE = 20  # identifications per second
DOWN_S = 6  # how long the broker stays dead


async def test_a_broker_killed_under_load_loses_nothing_and_doubles_nothing(tmp_path, infra):
    if infra.is_tansu:
        pytest.skip("Tansu keeps nothing across a restart (memory engine): run on Apache Kafka")
    rng = random.Random(11)
    async with running_system(tmp_path / "sys") as system:
        broker = system.sup.broker
        assert isinstance(broker, EmbeddedKafka), "the system runs on the embedded Apache Kafka"
        accepted: list[str] = []
        answers: Counter = Counter()
        sent_while_down = 0
        broker_down = asyncio.Event()
        stop = asyncio.Event()

        async with httpx.AsyncClient(timeout=30) as client:
            async def one(i: int) -> None:
                nonlocal sent_while_down
                agency, muni, body = synthetic_identification(rng)
                headers = {**system.headers(sub=f"{agency}.{muni}.duty", agency=agency, municipality=muni,
                                            roles=["reporter"]), "Idempotency-Key": f"kr-{i}"}
                if broker_down.is_set():
                    sent_while_down += 1
                for _attempt in range(20):  # a 503 is retried with the same key, as a client would
                    r = await client.post(f"{system.url('intake')}/v1/identifications", json=body, headers=headers)
                    answers[r.status_code] += 1
                    if r.status_code == 201:
                        accepted.append(r.json()["case_id"])
                        return
                    assert r.status_code == 503, r.text
                    await asyncio.sleep(0.5)
                raise AssertionError(f"identification {i} was never accepted")

            async def load() -> None:
                tasks, i, t0 = [], 0, time.monotonic()
                while not stop.is_set():
                    tasks.append(asyncio.create_task(one(i)))
                    i += 1
                    await asyncio.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
                await asyncio.gather(*tasks)

            loop = asyncio.get_running_loop()
            generator = asyncio.create_task(load())
            await asyncio.sleep(3)
            broker.kill()
            broker_down.set()
            killed_at = time.monotonic()
            await asyncio.sleep(DOWN_S)
            await loop.run_in_executor(None, broker.start)  # same port, same log directory
            broker_down.clear()
            back_after = time.monotonic() - killed_at
            await asyncio.sleep(5)
            stop.set()
            await generator

        assert sent_while_down >= RATE * (DOWN_S - 1), f"the load kept going while the broker was down ({sent_while_down})"
        await wait_until(lambda: all_ready(system), timeout_s=120, what="every service ready again by itself",
                         interval_s=0.5)
        figures = await assert_referred_and_alerted_exactly_once(system, accepted)
        print(f"\n[reliability] Apache Kafka SIGKILLed under {RATE}/s, back after {back_after:.1f}s; "
              f"{sent_while_down} sent while it was down; answers {dict(answers)}; {figures}")
