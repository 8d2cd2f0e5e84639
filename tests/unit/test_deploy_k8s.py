"""Kubernetes manifests: parse, build with kustomize (kubectl kustomize) when available, validate
core kinds against the Kubernetes JSON schemas (kubernetes-validate) when installed, and check
what production relies on: probes, requests/limits, non-root, PDBs, NetworkPolicies, KEDA caps."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings
from shared.topics import SPECS, Topic, Topics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SERVICES = ("intake", "referral", "notifications", "analytics")  # API + Kafka worker each
APPS = (*SERVICES, "workspace")  # the workspace: pages over the four APIs, no Kafka, no database
CONSUMES = {  # the topics whose lag KEDA reads for each consumer group
    "intake": (Topic.agency_inbound, Topic.referral_events),
    "referral": (Topic.case_events,),
    "notifications": (Topic.referral_events,),
    "analytics": (Topic.case_events, Topic.referral_events, Topic.notification_events),
}
WITH_DB = {"intake", "referral", "notifications"}
# notifications' e-mail/SMS delivery, its own Deployment (issue 18): no API, no migration, no token
DELIVERY = "notifications-delivery"


def raw_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S.rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def build(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kustomize:
        cmd = [kustomize, "build", str(K8S / overlay)]
    elif kubectl:
        cmd = [kubectl, "kustomize", str(K8S / overlay)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=["base", "overlays/production"])
def built(request) -> list[dict]:
    return build(request.param)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_every_manifest_parses_and_names_its_kind():
    docs = raw_docs()
    assert docs
    for d in docs:
        if d.get("kind") in ("Kustomization",) or "resources" in d and "apiVersion" not in d:
            continue
        assert d.get("apiVersion") and d.get("kind"), d


def test_core_kinds_validate_against_kubernetes_schemas(built):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate to validate schemas")
    checked = 0
    for d in built:
        if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].startswith(("apps/", "policy/", "networking.k8s.io/")):
            continue  # CRDs (KEDA, Strimzi): checked structurally below
        kv.validate(d, kv.latest_version(), strict=True)
        checked += 1
    assert checked >= 4 * len(APPS)


def test_every_deployment_has_probes_resources_and_runs_locked_down(built):
    deployments = by_kind(built, "Deployment")
    assert set(deployments) == {*APPS, DELIVERY}
    s = Settings(_env_file=None)
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        key, owner = name.replace("-", "_"), "notifications" if name == DELIVERY else name
        if name == DELIVERY:
            assert c["command"] == ["python", "-m", "services.notifications.delivery"] and "args" not in c
        else:
            assert c["args"] == [name]
        port = getattr(s, f"{key}_port")
        assert c["ports"][0]["containerPort"] == port
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": port, "metrics": s.metrics_port_for(key)}
        assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e for e in c["env"]}
        if owner in SERVICES:
            assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"kafka-{owner}"
        else:  # the workspace talks HTTP to the APIs only
            assert not [k for k in env if k.startswith("KAFKA_")], name
        assert ("DATABASE_URL" in env) == (owner in WITH_DB)
        # the master key reaches intake only
        master = env["ENCRYPTION_MASTER_KEY"]
        assert ("valueFrom" in master) == (name == "intake")
    config = by_kind(built, "ConfigMap")["clms-config"]["data"]
    assert config["CLMS_ENV"] == "production" and config["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert config["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512" and config["KAFKA_SSL_CAFILE"]


def test_every_service_has_a_service_and_a_pdb(built):
    services, pdbs = by_kind(built, "Service"), by_kind(built, "PodDisruptionBudget")
    for name in APPS:
        assert services[name]["spec"]["selector"] == {"app.kubernetes.io/name": name}
        # the Service fronting the API never exposes the monitoring port
        assert [p["targetPort"] for p in services[name]["spec"]["ports"]] == ["http"]
    for name in SERVICES:
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    # one replica: a PDB could only block node drains or allow everything
    assert "workspace" not in pdbs


def test_the_workspace_runs_one_replica_and_calls_the_four_apis_over_the_cluster_network(built):
    """Sessions live in the workspace's memory (services/workspace/sessions.py): a second replica
    would not know them, so it runs one replica, and nothing scales it (no KEDA, no HPA)."""
    dep = by_kind(built, "Deployment")["workspace"]
    assert dep["spec"]["replicas"] == 1
    assert not [d for d in built if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
                and d["spec"]["scaleTargetRef"]["name"] == "workspace"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    plain = {k: e["value"] for k, e in env.items() if "value" in e}
    config = by_kind(built, "ConfigMap")["clms-config"]["data"]
    services = by_kind(built, "Service")
    s = Settings(_env_file=None, **{**config, **plain})
    assert s.workspace_port == 8005 and s.metrics_port_for("workspace") == 9005
    for api in SERVICES:
        # http://<Service>, whose port 80 leads to the API's container port
        url = s.api_url(api)
        assert url == f"http://{api}", (api, url)
        (port,) = services[api]["spec"]["ports"]
        assert port["port"] == 80 and port["targetPort"] == "http"
    # sign-in at the OIDC issuer; the client secret (if any) from its own Secret
    assert s.oidc_issuer and s.oidc_client_id and s.oidc_jwks_url
    assert env["OIDC_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "clms-workspace", "key": "OIDC_CLIENT_SECRET", "optional": True}
    # no database, no Kafka, no service secret: nothing it holds opens case data without a user
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets == {"clms-workspace"}
    assert not {"DATABASE_URL", "DATABASE_MIGRATION_URL"} & set(env)
    assert "kafka-ca" not in {v["name"] for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    # alert e-mails and SMS link to the workspace
    assert config["WORKSPACE_URL"].startswith("https://")


def test_the_workspace_starts_with_the_manifests_settings_and_answers_its_probes(built):
    """The Deployment's env + the ConfigMap (CLMS_ENV=production, OIDC, no service secret) are
    settings the workspace accepts: its app starts and /healthz and /readyz (the probes) answer 200."""
    from fastapi.testclient import TestClient

    from services.workspace.app import create_app

    config = by_kind(built, "ConfigMap")["clms-config"]["data"]
    (c,) = by_kind(built, "Deployment")["workspace"]["spec"]["template"]["spec"]["containers"]
    plain = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    settings = Settings(_env_file=None, **{**config, **plain})
    with TestClient(create_app(settings)) as client:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert client.get(c[probe]["httpGet"]["path"]).status_code == 200, probe


def test_each_service_gets_its_runtime_and_its_migration_database_url_from_separate_secrets(built):
    """The runtime role (DATABASE_URL, `<service>_app`: data only, audit INSERT only) and the schema
    owner (DATABASE_MIGRATION_URL, used only by shared.db.migrate_service) come from two Secrets,
    as compose passes two URLs: without the migration URL the service would migrate with the
    runtime role, which may not create tables (deploy/postgres/roles.sql)."""
    for name, dep in by_kind(built, "Deployment").items():
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        if name == DELIVERY:  # the runtime role only: it applies no migration
            assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "clms-notifications", "key": "DATABASE_URL"}
            assert "DATABASE_MIGRATION_URL" not in env
            continue
        if name not in WITH_DB:
            assert not {"DATABASE_URL", "DATABASE_MIGRATION_URL"} & set(env), name
            continue
        runtime = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        owner = env["DATABASE_MIGRATION_URL"]["valueFrom"]["secretKeyRef"]
        assert runtime == {"name": f"clms-{name}", "key": "DATABASE_URL"}
        assert owner == {"name": f"clms-{name}-migration", "key": "DATABASE_MIGRATION_URL"}
        # the owner's Secret is read by this service's migration URL and nothing else
        uses = [(d["metadata"]["name"], e["name"]) for d in by_kind(built, "Deployment").values()
                for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
                if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == f"clms-{name}-migration"]
        assert uses == [(name, "DATABASE_MIGRATION_URL")]
        assert "DATABASE_URL" not in {k for k, e in env.items() if "value" in e}  # never a literal
    roles = (ROOT / "deploy/postgres/roles.sql").read_text()
    readme = (ROOT / "deploy/README.md").read_text()
    for name in WITH_DB:
        assert f"{name}_app" in roles
        assert f"clms-{name}-migration" in readme or "clms-<service>-migration" in readme


def test_scaled_objects_scale_on_the_consumer_group_and_never_past_the_partitions(built):
    scaled = by_kind(built, "ScaledObject")
    auths = by_kind(built, "TriggerAuthentication")
    s = Settings(_env_file=None)
    topics = Topics(s.topic_prefix)
    assert set(scaled) == set(SERVICES)
    for name, so in scaled.items():
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        partitions = min(SPECS[t].partitions for t in CONSUMES[name])
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["consumerGroup"] == s.group_id(name)
        if "topic" in meta:
            assert meta["topic"] in {topics.name(t) for t in CONSUMES[name]}
        assert meta["sasl"] == "scram_sha512" and meta["tls"] == "enable"
        assert auths[trigger["authenticationRef"]["name"]]


def selects(spec: dict, app: str) -> bool:
    """Whether a NetworkPolicy's podSelector selects the pods of `app` (their template labels)."""
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/part-of": "clms"}
    sel = spec["podSelector"]
    if any(labels.get(k) != v for k, v in sel.get("matchLabels", {}).items()):
        return False
    for e in sel.get("matchExpressions", []):
        have = labels.get(e["key"])
        ok = {"In": have in e.get("values", []), "NotIn": have not in e.get("values", []),
              "Exists": have is not None, "DoesNotExist": have is None}[e["operator"]]
        if not ok:
            return False
    return True


def ports_of(rule: dict) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}


def egress_peer(peer: dict) -> str:
    """Names a peer of the per-workload policies; anything unexpected fails the test."""
    ns = peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
    pod = peer.get("podSelector", {}).get("matchLabels", {})
    if peer.get("namespaceSelector") == {} and pod == {"k8s-app": "kube-dns"}:
        return "dns"
    if ns == "kafka" and pod == {"strimzi.io/cluster": "clms", "strimzi.io/kind": "Kafka"}:
        return "kafka"
    if ns == "postgres" and not pod:
        return "postgres"
    if "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0":
        # the internet without private, link-local (cloud metadata) ranges
        assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(peer["ipBlock"]["except"])
        return "internet"
    if "namespaceSelector" not in peer and set(pod) == {"app.kubernetes.io/name"} and pod["app.kubernetes.io/name"] in SERVICES:
        return f"api:{pod['app.kubernetes.io/name']}"  # a pod of this namespace
    raise AssertionError(f"unexpected egress peer {peer}")


def test_network_policies_default_deny_and_open_only_what_each_service_needs(built):
    """Exactly what each workload may reach, over every policy that selects it: DNS; Kafka (the
    four services); PostgreSQL (not analytics, not the workspace); the internet on SMTP and HTTPS
    (notifications-delivery alone); the identity provider on HTTPS (all five, identity-provider.yaml);
    the four APIs each on its own port (the workspace alone). notifications-delivery: DNS, Kafka,
    PostgreSQL, SMTP and HTTPS out; monitoring in."""
    policies = by_kind(built, "NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    s = Settings(_env_file=None)
    api_port = {a: getattr(s, f"{a}_port") for a in APPS}
    assert set(policies) == {"default-deny", "identity-provider", *APPS, DELIVERY}
    for name in (*APPS, DELIVERY):
        spec = policies[name]["spec"]
        assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}
        assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
        reach: dict[str, set] = {}
        for pname, policy in policies.items():
            if not selects(policy["spec"], name) or "Egress" not in policy["spec"]["policyTypes"]:
                continue
            for rule in policy["spec"].get("egress", []):
                assert rule.get("to") and rule.get("ports"), f"{pname}: egress rule open to everything"
                for peer in rule["to"]:
                    label = "identity-provider" if pname == "identity-provider" else egress_peer(peer)
                    reach.setdefault(label, set()).update(ports_of(rule))
        want = {"dns": {("UDP", 53), ("TCP", 53)}}
        if name in APPS:
            want["identity-provider"] = {("TCP", 443)}
        if name in SERVICES or name == DELIVERY:
            want["kafka"] = {("TCP", 9093)}
        if name in WITH_DB or name == DELIVERY:
            want["postgres"] = {("TCP", 5432)}
        if name == DELIVERY:  # SMTP relay and SMS gateway
            want["internet"] = {("TCP", 587), ("TCP", 465), ("TCP", 443)}
        if name == "workspace":
            want |= {f"api:{a}": {("TCP", api_port[a])} for a in SERVICES}
        assert reach == want, name

        # ingress: the ingress controller on the API port, monitoring on /metrics only, and (the
        # four APIs) the workspace on the API port; nothing else
        came: dict[str, set] = {}
        for pname, policy in policies.items():
            if not selects(policy["spec"], name) or "Ingress" not in policy["spec"]["policyTypes"]:
                continue
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from") and rule.get("ports"), f"{pname}: ingress from anywhere"
                for peer in rule["from"]:
                    if "namespaceSelector" in peer:
                        assert "podSelector" not in peer
                        source = peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    else:
                        source = "pod:" + peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                    came.setdefault(source, set()).update(ports_of(rule))
        if name == DELIVERY:  # no API: monitoring only
            assert came == {"monitoring": {("TCP", s.metrics_port_for("notifications_delivery"))}}
            continue
        want_in = {"ingress-nginx": {("TCP", api_port[name])}, "monitoring": {("TCP", s.metrics_port_for(name))}}
        if name in SERVICES:
            want_in["pod:workspace"] = {("TCP", api_port[name])}
        assert came == want_in, name


def test_the_identity_provider_is_reachable_on_https_only_and_only_by_the_five_workloads(built):
    """Production tokens are verified with the issuer's key set (OIDC_JWKS_URL), fetched over
    HTTPS by every API and by the workspace (which also signs users in at OIDC_ISSUER). The one
    policy that opens this names the provider (an address range or an in-cluster namespace the
    operator sets, deploy/README.md), never the whole internet, and opens TCP 443 only."""
    import ipaddress
    from urllib.parse import urlsplit

    spec = by_kind(built, "NetworkPolicy")["identity-provider"]["spec"]
    assert spec["policyTypes"] == ["Egress"] and "ingress" not in spec
    (expr,) = spec["podSelector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/name" and expr["operator"] == "In"
    assert sorted(expr["values"]) == sorted(APPS)
    assert "matchLabels" not in spec["podSelector"]
    assert not selects(spec, "something-else")
    (rule,) = spec["egress"]
    assert ports_of(rule) == {("TCP", 443)}
    assert rule["to"]
    for peer in rule["to"]:
        if "ipBlock" in peer:
            net = ipaddress.ip_network(peer["ipBlock"]["cidr"])
            assert net.prefixlen >= 24, f"{net}: the identity provider's addresses, not a wide range"
        else:
            assert peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
    # the URLs the code fetches are HTTPS on the default port, i.e. what the rule opens
    config = by_kind(built, "ConfigMap")["clms-config"]["data"]
    for key in ("OIDC_JWKS_URL", "OIDC_ISSUER", "JWT_ISSUER"):
        url = urlsplit(config[key])
        assert url.scheme == "https" and url.port in (None, 443), key
    readme = (ROOT / "deploy/README.md").read_text()
    assert "identity-provider" in readme and peer_placeholder(spec) in readme


def peer_placeholder(spec: dict) -> str:
    return spec["egress"][0]["to"][0].get("ipBlock", {}).get("cidr", "namespaceSelector")


def test_strimzi_users_match_the_compose_acls():
    docs = yaml.safe_load_all((K8S / "kafka" / "users.yaml").read_text())
    users = {d["metadata"]["name"]: d for d in docs}
    access = yaml.safe_load((ROOT / "deploy" / "kafka" / "access.yaml").read_text())
    assert set(users) == set(access["principals"])
    for name, u in users.items():
        assert u["spec"]["authentication"]["type"] == "scram-sha-512"
        for acl in u["spec"]["authorization"]["acls"]:
            assert acl["resource"]["name"] != "*"
            assert acl["resource"]["type"] in ("topic", "group")
