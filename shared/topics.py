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
    retention_ms: int = -1  # keep forever: the topics are the system's event log
    # the consumer groups (service names, before the topic prefix) that read this topic
    consumers: tuple[str, ...] = ()


# Same partition count on every event topic, so faust tables fed by several topics
# co-partition with their changelogs.
PARTITIONS = 6

REGISTRY: tuple[TopicSpec, ...] = (
    TopicSpec(Topic.agency_inbound, PARTITIONS, "case id (or any id the agency uses)",
              "Raw identifications published by agency systems; validated by intake",
              consumers=("intake",)),
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
              value="the original bytes, unchanged"),
)

SPECS: dict[Topic, TopicSpec] = {s.topic: s for s in REGISTRY}


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
    count (Tansu: 4), which would break co-partitioning.
    """
    existing = set(await admin.list_topics())
    wanted = [
        NewTopic(topics.name(s.topic), num_partitions=s.partitions,
                 replication_factor=replication_factor)
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
