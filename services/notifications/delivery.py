"""E-mail and SMS delivery, off the worker's path (issue 18).

The worker only records e-mail/SMS notifications as `pending` rows (and NOTIFYs
`service.PENDING_CHANNEL` in the same transaction); the `DeliveryLoop` sends them. It runs

- in its own process, `python -m services.notifications.delivery` (what `clms dev`/`make run`,
  docker-compose and deploy/k8s run, each beside the API/worker process started with
  `NOTIFY_DELIVERY_IN_PROCESS=false`): `app.create_delivery_app` gives it /healthz, /readyz and
  /metrics (monitoring port) and nothing else; it needs the database and the broker (dead
  letters), never applies migrations (the API/worker process does), and is woken by LISTEN;
- or inside the API/worker process (`NOTIFY_DELIVERY_IN_PROCESS=true`, the default when the
  service runs alone), woken directly after each commit.

Any number of either share the rows through leases (below), so nothing is sent twice while a
send is in flight, and a killed process's rows are claimed by another after NOTIFY_LEASE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from services.notifications import rules, store
from services.notifications.channels import (
    ChannelSender,
    DeliveryError,
    OutgoingMessage,
    PermanentDeliveryError,
)
from services.notifications.service import CONSUMER, notification_envelope
from services.notifications.store import SCHEMA
from shared import outbox
from shared.events import NotificationFailed, NotificationSent
from shared.kafka import DeadLetter, dead_letter
from shared.redact import redact_contacts
from shared.settings import Settings
from shared.topics import Topic, Topics
from shared.wakeup import Alarm

log = logging.getLogger("clms.notifications.delivery")

# How long the record of a sent message may wait for the other sends of its claim, so that they are
# recorded in one statement (a claim of 13 rows made 10 statements without it, at 100
# identifications/s: bench/README.md). It delays only the `sent` status and its event: the
# message is out already.
RECORD_LINGER_S = 0.05
RECORD_ON_STOP_S = 2.0  # stopping mid-claim: how long the record of what was sent may take


@dataclass
class _Lease:
    """One claim of the delivery loop: its token and when it ends on this replica's clock."""

    token: uuid.UUID
    valid_until: float  # loop.time()
    lost: set[uuid.UUID] = field(default_factory=set)  # rows whose send was cancelled
    recording: set[uuid.UUID] = field(default_factory=set)  # rows past their send


class DeliveryLoop:
    """Delivers pending e-mail/SMS notifications from the database, so retries survive restarts
    and never hold a partition; failures back off exponentially with jitter up to
    NOTIFY_MAX_ATTEMPTS, then `notification.failed` and a dead letter.

    Leases. A replica claims due rows under a fresh lease token for `lease_s` seconds
    (NOTIFY_LEASE_S; `next_attempt_at` is the end of the lease, so replicas share the work with
    `FOR UPDATE SKIP LOCKED`). While any of them is still waiting for the channel or being sent,
    the lease of those rows is renewed every third of `lease_s`, so a slow SMTP server never lets
    another replica take and send them again. The holder never sends past its lease: a row whose
    renewal finds another token (or none), or whose lease runs out because renewals could not
    reach the database, has its send cancelled before the lease ends (its local deadline is
    measured from before each claim/renewal statement, so it ends before the database's). A failed
    attempt is recorded only under the holder's token; a success is recorded by whoever sent it.
    What remains is the at-least-once window of any SMTP client: a send cancelled (or a process
    killed) after the server took the message and before it answered."""

    def __init__(self, *, pool: asyncpg.Pool, settings: Settings, senders: dict[str, ChannelSender],
                 producer: AIOKafkaProducer, topics: Topics, relay: outbox.OutboxRelay | None = None,
                 batch_size: int = 20, lease_s: float | None = None, metrics: Any = None):
        self.pool = pool
        self.settings = settings
        self.senders = senders
        self.producer = producer
        self.topics = topics
        self.relay = relay
        self.batch_size = batch_size
        self.lease_s = lease_s if lease_s is not None else settings.notify_lease_s
        self.metrics = metrics
        self.lost_leases = 0  # sends cancelled because this replica no longer held the lease
        self.alarm = Alarm()  # rung by wake(); says how long the loop sleeps (asleep_s)

    def wake(self) -> None:
        self.alarm.ring()

    async def run(self) -> None:
        """Deliver what is due, then sleep until the earliest pending row falls due (a retry after
        its backoff, or the end of a lease: a dead replica's rows), woken earlier by `wake()` (a
        commit that recorded new rows: directly in this process, by LISTEN in the delivery
        process). NOTIFY_POLL_INTERVAL_S caps the sleep, a safety net only: idle, the loop makes
        one round trip per cap, not one per half second (issue 18)."""
        backoff = 0.5
        while True:
            try:
                n = await self.run_once()
                await self.dead_letter_failed()
                backoff = 0.5
                if n < self.batch_size:
                    await self.alarm.wait(await self.seconds_to_sleep())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database or broker away: try again later
                log.warning("delivery loop paused %.1fs (%s: %s)", backoff, type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(10.0, backoff * 2)

    async def seconds_to_sleep(self) -> float:
        """Until the earliest pending row falls due (and a hair more, so that the claim then finds
        it due on the database's clock), at most NOTIFY_POLL_INTERVAL_S; a short pause when a row
        is due already but was not claimed (another replica holds its row lock this instant)."""
        async with self.pool.acquire() as conn:
            due_in = await store.seconds_until_next_delivery(conn)
        return rules.sleep_until_due(due_in, cap_s=self.settings.notify_poll_interval_s)

    async def run_once(self) -> int:
        loop = asyncio.get_running_loop()
        token = uuid.uuid4()
        claimed_at = loop.time()  # before the statement: the local lease ends before the database's
        async with self.pool.acquire() as conn:
            rows = await store.claim_due_deliveries(conn, limit=self.batch_size, lease_s=self.lease_s, token=token)
        if rows:
            lease = _Lease(token=token, valid_until=claimed_at + self.lease_s)
            sent: asyncio.Queue[asyncpg.Record | None] = asyncio.Queue()
            all_sent = asyncio.Event()
            tasks = {r["notification_id"]: asyncio.create_task(self._deliver(r, lease, sent)) for r in rows}
            keeper = asyncio.create_task(self._keep_lease(lease, tasks))
            recorder = asyncio.create_task(self._record_sent(sent, all_sent))
            try:
                await asyncio.wait(tasks.values())
                all_sent.set()
                sent.put_nowait(None)  # every send is over: the recorder ends once it has recorded them
                await recorder
            finally:
                keeper.cancel()
                for t in tasks.values():
                    t.cancel()  # only when run_once itself is cancelled: they are done otherwise
                await asyncio.gather(keeper, *tasks.values(), return_exceptions=True)
                if not recorder.done():
                    await self._record_before_stopping(recorder, sent, all_sent)
            if self.relay:
                self.relay.wake()
        return len(rows)

    async def _keep_lease(self, lease: "_Lease", tasks: dict[uuid.UUID, asyncio.Task]) -> None:
        """Renew the lease of the rows still in flight every third of the lease; cancel the send
        of a row this replica no longer holds, or of every row when the lease is about to end
        without a renewal (database away)."""
        loop = asyncio.get_running_loop()
        every = self.lease_s / 3
        margin = min(self.lease_s / 6, 5.0)
        while True:
            await asyncio.sleep(max(0.0, min(every, lease.valid_until - margin - loop.time())))
            in_flight = [nid for nid, t in tasks.items() if not t.done() and nid not in lease.recording]
            if not in_flight:
                return  # every row is sent (or being recorded): nothing left to hold
            if loop.time() >= lease.valid_until - margin:
                self._give_up(in_flight, tasks, lease, "the lease could not be renewed in time")
                continue
            asked_at = loop.time()
            try:
                async with self.pool.acquire() as conn:
                    kept = await store.renew_leases(conn, in_flight, token=lease.token, lease_s=self.lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - database away: try again before the lease ends
                log.warning("delivery lease not renewed (%s); retrying", type(exc).__name__)
                continue
            lease.valid_until = asked_at + self.lease_s
            lost = [nid for nid in in_flight if nid not in kept and nid not in lease.recording]
            if lost:
                self._give_up(lost, tasks, lease, "another replica holds it now")

    def _give_up(self, ids: list[uuid.UUID], tasks: dict[uuid.UUID, asyncio.Task], lease: "_Lease",
                 why: str) -> None:
        for nid in ids:
            lease.lost.add(nid)
            tasks[nid].cancel()
            self.lost_leases += 1
            log.warning("delivery of notification %s cancelled: %s", nid, why)

    async def _deliver(self, r: asyncpg.Record, lease: "_Lease", sent: "asyncio.Queue[asyncpg.Record | None]") -> None:
        try:
            error, permanent = await self._send(r)
        except asyncio.CancelledError:
            if r["notification_id"] in lease.lost:
                return  # not ours any more: the holder of the lease records the attempt
            raise
        lease.recording.add(r["notification_id"])  # from here on the keeper leaves this row alone
        if error is None:
            sent.put_nowait(r)  # recorded with the others sent meanwhile (`_record_sent`)
        else:
            await self._record(r, lease, error=error, permanent=permanent)

    async def _record_sent(self, sent: "asyncio.Queue[asyncpg.Record | None]", all_sent: asyncio.Event) -> None:
        """Record the rows sent, a batch per statement, until the None that ends the claim: once a
        row is sent, what else is sent until the claim's last send is over, or RECORD_LINGER_S at
        most (a slow SMTP server holds back no other row's record longer). A success is recorded
        whoever holds the lease (the message went out). A batch the database refuses is recorded
        row by row, so one bad row cannot hold back the others."""
        while True:
            batch = [await sent.get()]
            if batch[0] is not None and not all_sent.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECORD_LINGER_S):
                        await all_sent.wait()
            while not sent.empty():
                batch.append(sent.get_nowait())
            rows = [r for r in batch if r is not None]
            if rows:
                await self._record_sent_batch(rows)
            if len(rows) < len(batch):
                return

    async def _record_before_stopping(self, recorder: asyncio.Task, sent: "asyncio.Queue[asyncpg.Record | None]",
                                      all_sent: asyncio.Event) -> None:
        """The loop is stopping mid-claim (a deploy's SIGTERM): record what was sent already, at
        once and for RECORD_ON_STOP_S at most, rather than leave it to be sent again after the
        lease."""
        all_sent.set()
        sent.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(recorder), RECORD_ON_STOP_S)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - stopping anyway
            log.warning("sent notifications not all recorded before stopping (%s); they are sent again after "
                        "their lease", type(exc).__name__)
        finally:
            recorder.cancel()

    async def _record_sent_batch(self, rows: list[asyncpg.Record]) -> None:
        ids = [(r["notification_id"], r["attempts"] + 1) for r in rows]
        envelopes = [outbox.row(Topic.notification_events,
                                notification_envelope(NotificationSent, r, attempt=r["attempts"] + 1)) for r in rows]
        try:
            async with self.pool.acquire() as conn:
                await store.record_sent(conn, ids, envelopes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one row at a time below
            log.warning("%d sent notification(s) not recorded together (%s); recording each alone",
                        len(rows), type(exc).__name__)
            for r in rows:
                try:
                    await self._record(r, None, error=None, permanent=False)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - sent again once its lease ends (at least once)
                    log.warning("sent notification %s not recorded (%s); it will be sent again after its lease",
                                r["notification_id"], type(exc).__name__)
            return
        for r in rows:
            self._count("sent", r["channel"])

    async def _send(self, r: asyncpg.Record) -> tuple[str | None, bool]:
        """Send one row on its channel: (error or None, whether the error is permanent)."""
        sender = self.senders.get(r["channel"])
        message = OutgoingMessage(
            notification_id=str(r["notification_id"]), recipient=r["recipient"], channel=r["channel"],
            address=r["email"] if r["channel"] == "email" else r["phone"], language=r["language"],
            subject=r["subject"], body=r["body"], link=r["link"])
        try:
            if sender is None:
                raise PermanentDeliveryError(f"no sender for channel {r['channel']!r}")
            await sender.send(message)
        except PermanentDeliveryError as exc:  # an SMTP or gateway answer may quote the officer's address
            return redact_contacts(str(exc)), True
        except DeliveryError as exc:
            return redact_contacts(str(exc)), False
        except Exception as exc:  # noqa: BLE001 - an unexpected sender bug must not stop the loop
            return redact_contacts(f"{type(exc).__name__}: {exc}"[:300]), False
        return None, False

    async def _record(self, r: asyncpg.Record, lease: "_Lease | None", *, error: str | None, permanent: bool) -> None:
        """Record one attempt: sent, failed for good (`notification.failed`; the dead letter
        follows), or retried after a backoff. A failure is recorded only under this replica's
        lease token; a success always (the message went out, no one may send it again)."""
        nid, attempt = r["notification_id"], r["attempts"] + 1
        async with self.pool.acquire() as conn, conn.transaction():
            if error is not None and (lease is None or not await store.lock_if_leased(conn, nid, token=lease.token)):
                log.info("notification %s attempt not recorded: the lease moved to another replica", nid)
                return
            await store.record_attempt(conn, nid, attempt=attempt, error=error)
            if error is None:
                row = await store.mark_sent(conn, nid, attempt=attempt)
                if row:
                    await outbox.append(conn, schema=SCHEMA, topic=Topic.notification_events,
                                        envelope=notification_envelope(NotificationSent, row, attempt=attempt))
                self._count("sent", r["channel"])
            elif permanent or attempt >= r["max_attempts"]:
                row = await store.mark_failed(conn, nid, attempt=attempt, error=error)
                if row:
                    await outbox.append(conn, schema=SCHEMA, topic=Topic.notification_events,
                                        envelope=notification_envelope(NotificationFailed, row, attempts=attempt,
                                                                       error=error[:500]))
                log.warning("notification %s (%s) failed after %d attempt(s): %s", nid, r["channel"], attempt, error)
                self._count("failed", r["channel"])
            else:
                delay = rules.backoff_s(attempt, base_s=self.settings.notify_backoff_base_s,
                                        max_s=self.settings.notify_backoff_max_s, jitter=random.random())
                await store.schedule_retry(conn, nid, attempt=attempt, error=error, delay_s=delay)
                log.info("notification %s (%s) attempt %d failed, retry in %.1fs: %s",
                         nid, r["channel"], attempt, delay, error)
                self._count("retried", r["channel"])

    def _count(self, outcome: str, channel: str) -> None:
        if self.metrics is not None:
            self.metrics.labels(outcome=outcome, channel=channel).inc()

    async def dead_letter_failed(self) -> int:
        """Publish a dead letter for each failed notification not dead-lettered yet."""
        async with self.pool.acquire() as conn:
            rows = await store.failed_not_dead_lettered(conn)
            for r in rows:
                await dead_letter(self.producer, self.topics, self._letter(r))
                await store.mark_dead_lettered(conn, r["notification_id"])
        return len(rows)

    def _letter(self, r: asyncpg.Record) -> DeadLetter:
        """The original referral event, with the reason and an error that names no address."""
        return DeadLetter(
            topic=r["cause_topic"] or self.topics.referral_events,
            partition=r["cause_partition"] if r["cause_partition"] is not None else -1,
            offset=r["cause_offset"] if r["cause_offset"] is not None else -1,
            key=(r["cause_key"] or str(r["case_id"])).encode(),
            value=r["cause_value"] or orjson.dumps({"notification_id": str(r["notification_id"]),
                                                   "cause_event_id": str(r["event_id"])}),
            reason="delivery_failed",
            error=(f"notification {r['notification_id']} to {r['recipient']} by {r['channel']} "
                   f"failed after {r['attempts']} attempt(s): {r['last_error']}"),
            group=self.settings.group_id(CONSUMER),
        )


if __name__ == "__main__":
    from services.notifications.app import create_delivery_app
    from shared.service import serve

    serve("notifications_delivery", create_delivery_app)
