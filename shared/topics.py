"""The topic registry: every topic the system uses, declared once with partitions and key.

Code never writes a topic name as a literal: it asks `Topics` (bound to settings, so tests can
isolate themselves with a prefix) for the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


class Topic(StrEnum):
    agency_inbound = "clms.agency-inbound"
    case_events = "clms.case-events"
    referral_events = "clms.referral-events"
    notification_events = "clms.notification-events"
    dead_letters = "clms.dead-letters"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    topic: Topic
    partitions: int
    key: str
    description: str
    value: str = "CloudEvents 1.0 JSON envelope (shared.events.Envelope)"
    # How long the broker keeps a record (retention.ms; -1 = forever). The event topics are the
    # system's event log and keep everything; see RETENTION below for the two short ones.
    retention_ms: int = -1
    # "delete" for logs, "compact" for a topic that is a table (latest value per key). None of
    # the registry topics is a table; faust's table changelogs are (deploy/kafka/render.py).
    cleanup_policy: str = "delete"
    # the consumer groups (service names, before the topic prefix) that read this topic
    consumers: tuple[str, ...] = ()


HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# clms.agency-inbound is only a hand-over: intake turns an identification into a case (its
# personal part encrypted at rest in intake's database) within seconds, so a copy older than a
# few days serves nothing and is one more copy of a child's (encrypted) identity that
# `clms erase` cannot reach. 3 days = a long weekend of intake being down, after which the
# agency re-sends. A dead-lettered inbound identification is replayed from this topic
# (`clms dlq replay` re-reads the original), so it can be replayed for these 3 days.
INBOUND_RETENTION_MS = 3 * DAY_MS
# clms.dead-letters must survive a weekend (and a holiday) of an operator finding, fixing and
# replaying them, but must not become a second, unbounded event log: 14 days.
DEAD_LETTER_RETENTION_MS = 14 * DAY_MS

# Same partition count on every event topic, so faust tables fed by several topics
# co-partition with their changelogs.
PARTITIONS = 6

REGISTRY: tuple[TopicSpec, ...] = (
    TopicSpec(Topic.agency_inbound, PARTITIONS, "case id (or any id the agency uses)",
              "Identifications published by agency systems (JWS-signed by the sending office, the "
              "personal part JWE-encrypted to intake); verified, decrypted and validated by intake",
              value="JWS compact serialization (ES256) of a CloudEvents 1.0 JSON envelope",
              retention_ms=INBOUND_RETENTION_MS, consumers=("intake",)),
    TopicSpec(Topic.case_events, PARTITIONS, "case id",
              "case.* facts published by intake through its outbox",
              consumers=("referral", "analytics")),
    TopicSpec(Topic.referral_events, PARTITIONS, "case id",
              "referral.* facts published by the referral service through its outbox",
              consumers=("intake", "notifications", "analytics")),
    TopicSpec(Topic.notification_events, PARTITIONS, "case id",
              "notification.* facts published by the notifications service",
              consumers=("analytics",)),
    TopicSpec(Topic.dead_letters, PARTITIONS, "original key",
              "Messages a consumer could not process, with headers naming the original topic, "
              "partition, offset, consumer group and the error",
              value="the original bytes, unchanged (a redaction note for an inbound identification)",
              retention_ms=DEAD_LETTER_RETENTION_MS),
)

SPECS: dict[Topic, TopicSpec] = {s.topic: s for s in REGISTRY}


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    """The broker configs of a registry topic: the same in ensure_topics, compose and k8s."""
    return {"cleanup.policy": spec.cleanup_policy, "retention.ms": str(spec.retention_ms)}


def consumed_by() -> dict[str, set[Topic]]:
    """Service consumer group -> the registry topics it reads."""
    groups: dict[str, set[Topic]] = {}
    for spec in REGISTRY:
        for group in spec.consumers:
            groups.setdefault(group, set()).add(spec.topic)
    return groups


class Topics:
    """Topic names for one deployment (a prefix isolates tests and side-by-side stacks)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix

    def name(self, topic: Topic) -> str:
        return f"{self.prefix}{topic.value}"

    def logical(self, name: str) -> Topic | None:
        """The registry entry behind a physical topic name, if any."""
        if not name.startswith(self.prefix):
            return None
        try:
            return Topic(name[len(self.prefix):])
        except ValueError:
            return None

    @property
    def agency_inbound(self) -> str:
        return self.name(Topic.agency_inbound)

    @property
    def case_events(self) -> str:
        return self.name(Topic.case_events)

    @property
    def referral_events(self) -> str:
        return self.name(Topic.referral_events)

    @property
    def notification_events(self) -> str:
        return self.name(Topic.notification_events)

    @property
    def dead_letters(self) -> str:
        return self.name(Topic.dead_letters)

    def all(self) -> list[str]:
        return [self.name(s.topic) for s in REGISTRY]


async def declare_topics(admin: AIOKafkaAdminClient, topics: Topics, *,
                         replication_factor: int = 1) -> list[str]:
    """Create every registry topic that does not exist yet; return the names created.

    Declared explicitly because a broker that auto-creates topics picks its own partition
    count (Tansu: 4), which would break co-partitioning, and its own retention (forever),
    which would keep inbound identifications and dead letters far longer than they may be kept.
    Topics that already exist keep their configs (change them with kafka-configs.sh, or the
    generated deploy/kafka/init-topics.sh / Strimzi KafkaTopic resources).
    """
    existing = set(await admin.list_topics())
    wanted = [
        NewTopic(topics.name(s.topic), num_partitions=s.partitions,
                 replication_factor=replication_factor, topic_configs=topic_configs(s))
        for s in REGISTRY
        if topics.name(s.topic) not in existing
    ]
    if not wanted:
        return []
    try:
        await admin.create_topics(wanted)
    except TopicAlreadyExistsError:
        pass  # a concurrent declarer won the race; the partition count is the registry's either way
    return [t.name for t in wanted]
