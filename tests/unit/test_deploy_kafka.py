"""Kafka access for production: every principal gets exactly the ACLs its service needs.

Expected topics come from the topic registry (shared.topics) and the services' own constants,
never from literals; the applied scripts are parsed, not trusted.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings
from shared.topics import REGISTRY, SPECS, Topic, Topics

ROOT = Path(__file__).resolve().parents[2]
KAFKA = ROOT / "deploy" / "kafka"
SERVICES = ("intake", "referral", "notifications", "analytics")

# What each service reads and writes (DESIGN.md, cross-service agreements). Everyone who consumes
# dead-letters what it cannot process.
NEEDS: dict[str, dict[str, set[Topic]]] = {
    "intake": {"read": {Topic.agency_inbound, Topic.referral_events},
               "write": {Topic.case_events, Topic.dead_letters}},
    "referral": {"read": {Topic.case_events}, "write": {Topic.referral_events, Topic.dead_letters}},
    "notifications": {"read": {Topic.referral_events},
                      "write": {Topic.notification_events, Topic.dead_letters}},
    "analytics": {"read": {Topic.case_events, Topic.referral_events, Topic.notification_events},
                  "write": {Topic.dead_letters}},
}
FAUST_INTERNAL_OPS = {"Create", "Describe", "DescribeConfigs", "Read", "Write"}


def uses_faust(service: str) -> bool:
    return any("make_faust_app" in p.read_text() for p in (ROOT / "services" / service).glob("*.py"))


def parse_acls() -> set[tuple[str, str, str, str, str]]:
    """(principal, resource, name, pattern, operation) from the `acl ...` lines of init-security.sh."""
    out = set()
    for line in (KAFKA / "init-security.sh").read_text().splitlines():
        if not line.startswith("acl "):
            continue
        args = shlex.split(line)[1:]
        principal = resource = name = None
        pattern, ops = "literal", []
        it = iter(args)
        for a in it:
            if a == "--allow-principal":
                principal = next(it)
            elif a == "--operation":
                ops.append(next(it))
            elif a in ("--topic", "--group", "--cluster", "--transactional-id"):
                resource, name = a[2:], next(it) if a != "--cluster" else "kafka-cluster"
            elif a == "--resource-pattern-type":
                pattern = next(it)
            else:
                pytest.fail(f"unexpected kafka-acls argument {a!r} in: {line}")
        assert principal and principal.startswith("User:"), line
        out |= {(principal[5:], resource, name, pattern, op) for op in ops}
    return out


def expected_acls() -> set[tuple[str, str, str, str, str]]:
    settings = Settings(_env_file=None)
    topics = Topics(settings.topic_prefix)
    out = set()
    for svc, need in NEEDS.items():
        group = settings.group_id(svc)
        for t in need["read"]:
            out |= {(svc, "topic", topics.name(t), "literal", op) for op in ("Read", "Describe")}
        for t in need["write"]:
            out |= {(svc, "topic", topics.name(t), "literal", op) for op in ("Write", "Describe")}
        out.add((svc, "group", group, "literal", "Read"))
        if uses_faust(svc):
            out |= {(svc, "topic", f"{group}-", "prefixed", op) for op in FAUST_INTERNAL_OPS}
    return out


def test_needs_cover_only_registry_topics_and_match_the_services_code():
    for need in NEEDS.values():
        assert need["read"] | need["write"] <= set(SPECS)
    # cross-check with the services' own declarations where they are importable constants
    from services.analytics.worker import SOURCE_TOPICS
    from services.intake.worker import GROUP as INTAKE_GROUP

    assert set(SOURCE_TOPICS) == NEEDS["analytics"]["read"]
    assert INTAKE_GROUP == "intake"
    # every event topic someone writes is read by someone (nothing published into the void)
    written = set().union(*(n["write"] for n in NEEDS.values())) - {Topic.dead_letters}
    read = set().union(*(n["read"] for n in NEEDS.values()))
    assert written <= read


def test_every_principal_has_exactly_the_acls_its_service_needs():
    actual = parse_acls()
    expected = expected_acls()
    assert actual - expected == set(), "ACLs beyond what the services need"
    assert expected - actual == set(), "ACLs missing"


def test_no_wildcards_no_allow_everyone_and_only_admin_is_super():
    texts = {p.name: p.read_text() for p in KAFKA.iterdir() if p.suffix in (".sh", ".yaml")}
    for name, text in texts.items():
        assert "User:*" not in text, name
        assert "allow.everyone.if.no.acl.found=true" not in text, name
    start = texts["start.sh"]
    assert "allow.everyone.if.no.acl.found=false" in start
    assert "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer" in start
    assert re.search(r"^super\.users=User:admin$", start, re.M)
    for principal, resource, name, pattern, _ in parse_acls():
        assert name not in ("*", "") and "*" not in name, (principal, name)
        assert resource in ("topic", "group"), "services get no cluster-level ACLs"
        if pattern == "prefixed":  # only the faust app's own internal-topic prefix
            assert name == f"{principal}-" and uses_faust(principal)
    access = yaml.safe_load((KAFKA / "access.yaml").read_text())
    assert access["super_user"] == "admin" and "admin" not in access["principals"]
    assert sorted(access["principals"]) == sorted(SERVICES)


def test_client_listeners_are_sasl_scram_and_no_plaintext_listener_exists():
    start = (KAFKA / "start.sh").read_text()
    proto = dict(kv.split(":") for kv in
                 re.search(r"^listener\.security\.protocol\.map=(.+)$", start, re.M).group(1).split(","))
    assert "PLAINTEXT" not in proto.values() and "SSL" not in proto.values()
    assert set(proto.values()) <= {"SASL_PLAINTEXT", "SASL_SSL"}
    assert re.search(r"^sasl\.enabled\.mechanisms=SCRAM-SHA-512$", start, re.M)
    assert "--add-scram" in start  # the admin credential exists before the broker serves anyone


def test_every_service_user_gets_a_scram_credential_from_its_own_variable():
    script = (KAFKA / "init-security.sh").read_text()
    for svc in SERVICES:
        assert f'user {svc} "$KAFKA_{svc.upper()}_PASSWORD"' in script
    assert "SCRAM-SHA-512=[iterations=8192,password=$2]" in script


def parse_topics() -> dict[str, tuple[int, dict[str, str]]]:
    out = {}
    for line in (KAFKA / "init-topics.sh").read_text().splitlines():
        if line.startswith("topic "):
            args = shlex.split(line)
            configs = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--config")
            out[args[1]] = (int(args[2]), configs)
    return out


def test_topic_init_creates_every_registry_topic_with_its_partitions_and_retention():
    created = parse_topics()
    topics = Topics(Settings(_env_file=None).topic_prefix)
    for spec in REGISTRY:
        partitions, configs = created[topics.name(spec.topic)]
        assert partitions == spec.partitions
        assert configs["retention.ms"] == str(spec.retention_ms)
        assert configs["cleanup.policy"] == spec.cleanup_policy
    script = (KAFKA / "init-topics.sh").read_text()
    assert 'RF="${KAFKA_REPLICATION_FACTOR:-1}"' in script and '--replication-factor "$RF"' in script
    assert "--if-not-exists" in script


def test_faust_changelogs_are_precreated_compacted_and_copartitioned():
    from services.analytics.tables import CASES_TABLE

    group = Settings(_env_file=None).group_id("analytics")
    partitions, configs = parse_topics()[f"{group}-{CASES_TABLE}-changelog"]
    assert configs["cleanup.policy"] == "compact"
    assert partitions == SPECS[Topic.case_events].partitions
    for svc in SERVICES:
        if uses_faust(svc):
            assert parse_topics()[f"{svc}-__assignor-__leader"][0] == 1


def test_generated_files_are_fresh():
    sys.path.insert(0, str(KAFKA))
    try:
        import render
    finally:
        sys.path.remove(str(KAFKA))
    for path, text in render.outputs().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run deploy/kafka/render.py"


def test_retention_is_the_registrys_and_the_same_in_compose_and_kubernetes():
    """issue 15: inbound identifications and dead letters are kept days, not forever, and both
    deployments say so with the registry's numbers (the event topics stay the event log)."""
    day = 24 * 3600 * 1000
    assert SPECS[Topic.agency_inbound].retention_ms == 3 * day
    assert SPECS[Topic.dead_letters].retention_ms == 14 * day
    for t in (Topic.case_events, Topic.referral_events, Topic.notification_events):
        assert SPECS[t].retention_ms == -1 and SPECS[t].cleanup_policy == "delete"
    compose = parse_topics()
    k8s = {d["spec"]["topicName"]: d["spec"] for d in
           yaml.safe_load_all((ROOT / "deploy" / "k8s" / "kafka" / "topics.yaml").read_text()) if d}
    topics = Topics(Settings(_env_file=None).topic_prefix)
    for spec in REGISTRY:
        name = topics.name(spec.topic)
        want = {"retention.ms": str(spec.retention_ms), "cleanup.policy": spec.cleanup_policy}
        assert {k: compose[name][1][k] for k in want} == want, name
        assert {k: str(k8s[name]["config"][k]) for k in want} == want, name
        assert k8s[name]["partitions"] == compose[name][0] == spec.partitions
    # the faust table changelogs are tables: compacted in both
    for name, (_, configs) in compose.items():
        if name.endswith("-changelog"):
            assert configs["cleanup.policy"] == "compact" and k8s[name]["config"]["cleanup.policy"] == "compact"
