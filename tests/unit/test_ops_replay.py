"""`clms dlq replay` records who replayed from the credentials it runs with (issue 16), and knows
which consumer groups read which topic as deployed."""

from __future__ import annotations

import getpass

from clms.ops import consumer_groups, operator_identity
from shared.settings import Settings
from shared.topics import Topic


def test_the_operator_is_the_kafka_principal_else_the_os_user():
    assert operator_identity(Settings(_env_file=None, KAFKA_SASL_USERNAME="ops-alice")) == "kafka:ops-alice"
    assert operator_identity(Settings(_env_file=None)) == f"os:{getpass.getuser()}"


def test_replayable_groups_are_the_registry_consumers_as_deployed():
    s = Settings(_env_file=None, CLMS_TOPIC_PREFIX="t1.", ANALYTICS_APP_ID="analytics-v2")
    assert consumer_groups(s, Topic.agency_inbound) == {"t1.intake"}
    assert consumer_groups(s, Topic.case_events) == {"t1.referral", "t1.analytics-v2"}
    assert consumer_groups(s, Topic.dead_letters) == set()
