"""CLMS_BROKER=auto|kafka|tansu: which embedded broker `make run` and `make test` start."""

from __future__ import annotations

import pytest

from shared import kafka_broker, tansu
from shared.settings import Settings


def _which(present: set[str]):
    return lambda tool: f"/usr/bin/{tool}" if tool in present else None


def test_auto_picks_apache_kafka_where_java_and_maven_answer(monkeypatch):
    monkeypatch.setattr(kafka_broker.shutil, "which", _which({"java", "mvn"}))
    assert kafka_broker.choose_broker("auto") == ("kafka", "java and mvn are present")


@pytest.mark.parametrize("present,missing", [({"mvn"}, "java"), ({"java"}, "mvn"), (set(), "java and mvn")])
def test_auto_falls_back_to_tansu_and_says_why(monkeypatch, present, missing):
    monkeypatch.setattr(kafka_broker.shutil, "which", _which(present))
    kind, why = kafka_broker.choose_broker("auto")
    assert kind == "tansu" and why.startswith(f"{missing} not found")


def test_kafka_without_java_is_a_sentence_with_the_fix(monkeypatch):
    monkeypatch.setattr(kafka_broker.shutil, "which", _which(set()))
    with pytest.raises(RuntimeError, match="install a JDK.*or set CLMS_BROKER=tansu"):
        kafka_broker.choose_broker("kafka")


def test_an_unknown_choice_is_refused():
    with pytest.raises(RuntimeError, match="not one of auto, kafka, tansu"):
        kafka_broker.choose_broker("redpanda")


def test_tansu_workarounds_apply_only_on_tansu():
    kafka = Settings(_env_file=None, CLMS_BROKER_KIND="kafka")  # type: ignore[call-arg]
    fallback = Settings(_env_file=None, CLMS_BROKER_KIND="tansu")  # type: ignore[call-arg]
    assert kafka.kafka_enable_idempotence and not fallback.kafka_enable_idempotence
    assert kafka.kafka_fetch_max_wait_ms == 5000 and fallback.kafka_fetch_max_wait_ms == 20
    assert tansu.clamp_lag(kafka, 5, 6) == -1 and tansu.clamp_lag(fallback, 5, 6) == 0
    assert tansu.changelog_batch_size(kafka) is None and tansu.changelog_batch_size(fallback) == 1


def test_the_broker_is_pinned_to_a_release_the_python_clients_speak():
    # Kafka 4.0 removed protocol versions aiokafka 0.14 still sends (KIP-896)
    major = int(kafka_broker.kafka_version().split(".")[0])
    assert major == 3, "see shared/broker/pom.xml before moving to Kafka 4"


def test_a_cluster_id_never_reads_as_an_option_to_the_storage_tool():
    # about 1 in 64 base64url ids start with "-": the storage tool then refused to format
    ids = [kafka_broker._cluster_id(f"/tmp/clms-test-{i}") for i in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
    assert kafka_broker._cluster_id("/same/dir") == kafka_broker._cluster_id("/same/dir")
