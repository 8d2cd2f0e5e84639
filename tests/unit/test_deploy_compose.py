"""docker-compose.yml: healthchecks, start order, limits, non-root users, credentials per
service, nothing plaintext or wide open on the host. (No Docker engine here: parsed, not run.)"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SERVICES_ = ("intake", "referral", "notifications", "analytics")  # API + Kafka worker each
APPS = (*SERVICES_, "workspace")  # the workspace: pages over the four APIs, no Kafka, no database
WITH_DB = ("intake", "referral", "notifications")


def interpolate(value: str) -> str:
    """Compose interpolation with defaults taken and required variables set to a real-looking value."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::-([^}]*))?(?::\?[^}]*)?\}",
                  lambda m: m.group(1) if m.group(1) is not None else "set-in-dotenv-0123456789", value)


def one_shot(name: str) -> bool:
    return SERVICES[name].get("restart") == "no"


def test_compose_parses_and_has_the_whole_stack():
    for name in (*APPS, "kafka", "kafka-security", "kafka-topics", "postgres", "mailpit", "prometheus", "grafana"):
        assert name in SERVICES, name
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["postgres"]["image"].startswith("postgres:16")


@pytest.mark.parametrize("name", list(SERVICES))
def test_every_service_has_healthcheck_limits_and_a_non_root_user(name):
    svc = SERVICES[name]
    if not one_shot(name):
        hc = svc.get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: no healthcheck"
    limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
    assert limits.get("memory") and limits.get("cpus"), f"{name}: no resource limits"
    user = str(svc.get("user", "")).split(":")[0]
    assert user and user not in ("root", "0"), f"{name}: runs as root"
    assert "env_file" not in svc, f"{name}: env_file hands every secret to the container"


@pytest.mark.parametrize("name", list(SERVICES))
def test_depends_on_uses_conditions(name):
    deps = SERVICES[name].get("depends_on", {})
    assert isinstance(deps, dict), f"{name}: depends_on without conditions"
    for dep, spec in deps.items():
        assert dep in SERVICES
        cond = spec["condition"]
        assert cond in ("service_healthy", "service_completed_successfully", "service_started")
        if one_shot(dep):
            assert cond == "service_completed_successfully", (name, dep)
        elif cond == "service_started":
            assert name in ("prometheus",), f"{name} must wait for {dep} to be healthy"


@pytest.mark.parametrize("name", SERVICES_)
def test_app_services_start_after_broker_security_topics_and_database(name):
    deps = SERVICES[name]["depends_on"]
    assert deps["kafka"]["condition"] == "service_healthy"
    assert deps["kafka-security"]["condition"] == "service_completed_successfully"
    assert deps["kafka-topics"]["condition"] == "service_completed_successfully"
    if name in WITH_DB:
        assert deps["postgres"]["condition"] == "service_healthy"
    hc = " ".join(SERVICES[name]["healthcheck"]["test"])
    port = getattr(Settings(_env_file=None), f"{name}_port")
    assert f"127.0.0.1:{port}/healthz" in hc
    assert SERVICES[name]["command"] == [name]  # the image's entrypoint is `clms serve`


@pytest.mark.parametrize("name", SERVICES_)
def test_each_service_authenticates_as_its_own_principal(name):
    env = SERVICES[name]["environment"]
    access = yaml.safe_load((ROOT / "deploy/kafka/access.yaml").read_text())
    assert env["KAFKA_SASL_USERNAME"] == name and name in access["principals"]
    assert env["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["KAFKA_SECURITY_PROTOCOL"].startswith("SASL_")
    var = f"KAFKA_{name.upper()}_PASSWORD"
    assert env["KAFKA_SASL_PASSWORD"].startswith("${" + var)
    assert SERVICES["kafka-security"]["environment"][var].startswith("${" + var)
    # no service holds another's Kafka password or the admin password
    others = [v for k, v in env.items() if "KAFKA_" in str(v) and "PASSWORD" in str(v) and k != "KAFKA_SASL_PASSWORD"]
    assert others == []
    # settings accept the compose values and reach the client path
    s = Settings(_env_file=None, **{k: interpolate(str(v)) for k, v in env.items()})
    assert s.kafka_sasl_username == name and s.group_id(name) == name


@pytest.mark.parametrize("name", WITH_DB)
def test_each_service_uses_its_own_database_role(name):
    # the runtime role of DATABASE_URL; the schema owner only migrates (DATABASE_MIGRATION_URL)
    url = urlsplit(SERVICES[name]["environment"]["DATABASE_URL"])
    assert url.username == f"{name}_app" and url.password == "${POSTGRES_%s_APP_PASSWORD}" % name.upper()
    owner = urlsplit(SERVICES[name]["environment"]["DATABASE_MIGRATION_URL"])
    assert owner.username == name and owner.password == "${POSTGRES_%s_PASSWORD}" % name.upper()
    roles = (ROOT / "deploy/postgres/roles.sql").read_text()
    assert f"CREATE SCHEMA IF NOT EXISTS {name}" in roles and f"AUTHORIZATION {name};" in roles
    for other in ("analytics", "workspace"):
        assert not {"DATABASE_URL", "DATABASE_MIGRATION_URL"} & set(SERVICES[other]["environment"])


def test_secrets_reach_only_the_services_that_use_them():
    env = {n: SERVICES[n]["environment"] for n in APPS}
    assert env["intake"]["ENCRYPTION_MASTER_KEY"].startswith("${ENCRYPTION_MASTER_KEY")
    assert env["intake"]["CHILD_REF_KEY"].startswith("${CHILD_REF_KEY")
    assert env["notifications"]["WEBHOOK_SECRET"].startswith("${WEBHOOK_SECRET")
    for n in APPS:
        for key, owner in (("ENCRYPTION_MASTER_KEY", "intake"), ("CHILD_REF_KEY", "intake"),
                           ("IDEMPOTENCY_HMAC_KEY", "intake"), ("WEBHOOK_SECRET", "notifications")):
            if n != owner:
                assert "${" not in env[n][key], f"{n} must not receive {key}"
    assert env["notifications"]["SMTP_HOST"] == "mailpit" and env["notifications"]["SMTP_PORT"] == "1025"


def test_the_workspace_runs_from_the_image_and_reaches_only_the_four_apis():
    """The workspace (browser pages) is one container of the same image: `clms serve workspace`,
    healthcheck on /healthz, started once the four APIs are healthy; it calls them by their
    compose names and ports on the `api` network and is on no broker or database network, with
    no Kafka credential, no database URL and no service secret."""
    ws = SERVICES["workspace"]
    env = ws["environment"]
    assert ws["image"] == SERVICES["intake"]["image"] and ws["command"] == ["workspace"]
    assert ws["user"] == "10001:10001" and ws["read_only"] is True and ws["cap_drop"] == ["ALL"]
    s = Settings(_env_file=None, **{k: interpolate(str(v)) for k, v in env.items()})
    assert s.workspace_port == 8005 and s.metrics_port_for("workspace") == 9005
    assert "127.0.0.1:8005/healthz" in " ".join(ws["healthcheck"]["test"])
    assert ws["ports"] == ["127.0.0.1:8005:8005"]
    assert {d: c["condition"] for d, c in ws["depends_on"].items()} == {a: "service_healthy" for a in SERVICES_}
    # the APIs by name on the network they share with the workspace, on their container ports
    assert set(ws["networks"]) == {"api", "metrics"}
    for api in SERVICES_:
        port = int(SERVICES[api]["environment"][f"{api.upper()}_PORT"])
        assert s.api_url(api) == f"http://{api}:{port}", api
        assert "api" in SERVICES[api]["networks"], f"{api} is not reachable from the workspace"
    assert not [k for k in env if k.startswith(("KAFKA_", "DATABASE_"))]
    for key in ("CHILD_REF_KEY", "ENCRYPTION_MASTER_KEY", "IDEMPOTENCY_HMAC_KEY", "WEBHOOK_SECRET"):
        assert env[key] == "not-used-by-workspace"
    # OIDC sign-in from .env, off when unset; development sign-in signs with the shared JWT_SECRET
    for key in ("OIDC_ISSUER", "OIDC_CLIENT_ID", "OIDC_CLIENT_SECRET", "OIDC_JWKS_URL"):
        assert env[key] == "${%s:-}" % key
    assert env["JWT_SECRET"] == SERVICES["intake"]["environment"]["JWT_SECRET"]
    # alert e-mails and SMS link to the workspace as it is published
    assert SERVICES["notifications"]["environment"]["WORKSPACE_URL"] == env["WORKSPACE_URL"]
    assert interpolate(env["WORKSPACE_URL"]) == "http://127.0.0.1:8005"


def test_host_ports_are_loopback_only_and_kafka_exposes_no_plaintext_listener():
    for name, svc in SERVICES.items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} on every interface"
    start = (ROOT / "deploy/kafka/start.sh").read_text()
    listeners = dict(re.match(r"(\w+)://:(\d+)", item).groups()[::-1]
                     for item in re.search(r"^listeners=(.+)$", start, re.M).group(1).split(","))
    proto = dict(kv.split(":") for kv in re.search(r"^listener\.security\.protocol\.map=(.+)$", start, re.M).group(1).split(","))
    for p in SERVICES["kafka"]["ports"]:
        container_port = str(p).rsplit(":", 1)[1]
        assert proto[listeners[container_port]] in ("SASL_PLAINTEXT", "SASL_SSL")


def test_every_required_variable_has_an_example_and_examples_are_refused_in_production():
    text = (ROOT / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert required <= set(example), required - set(example)
    for var in required:
        if var.endswith("PASSWORD"):
            assert "change-me" in example[var], f"{var}: example must be an obvious placeholder"
    with pytest.raises(ValueError):
        Settings(_env_file=None, **{**{k: v for k, v in example.items() if k in (
            "JWT_SECRET", "CHILD_REF_KEY", "ENCRYPTION_MASTER_KEY", "WEBHOOK_SECRET")}, "CLMS_ENV": "production"})


def test_prometheus_scrapes_every_service_and_grafana_is_provisioned():
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    s = Settings(_env_file=None)
    for name in APPS:
        # the monitoring port (the API port answers 404 on /metrics)
        assert f"{name}:{s.metrics_port_for(name)}" in targets
        assert f"{name}:{getattr(s, f'{name}_port')}" not in targets
    import json

    dash = json.loads((ROOT / "deploy/grafana/dashboards/clms-overview.json").read_text())
    assert dash["uid"] and dash["panels"]
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_grafana_dashboard_plots_metrics_the_services_export():
    """Every metric the dashboard queries is one a service or shared/metrics.py defines."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    dash = json.loads((root / "deploy/grafana/dashboards/clms-overview.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    names = set(re.findall(r"\b(clms_[a-z_]+?)(?:_bucket|_count|_sum)?\b", exprs))
    code = (root / "shared/metrics.py").read_text() + "".join(
        p.read_text() for p in (root / "services").glob("*/app.py"))
    defined = set(re.findall(r'"(clms_[a-z_]+)"', code))
    # prometheus_client exports counters with a _total suffix
    defined |= {n + "_total" for n in defined if not n.endswith("_total")}
    missing = sorted(n for n in names if n not in defined)
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("consumed", "lag", "dead letters", "outbox", "overdue referrals by agency"):
        assert needed in titles, needed
    assert "municipality" not in exprs  # no metric carries a municipality label any more


def test_no_metric_counting_children_or_referrals_has_a_municipality_label():
    """A municipality label on a count of cases, children or referrals exports exact small counts
    per municipality to whoever can scrape (issue 15): labels are agency, channel, topic... only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = [root / "shared/metrics.py", *(root / "services").glob("*/*.py")]
    found = []
    for f in files:
        text = f.read_text()
        for m in re.finditer(r"\b(?:Gauge|Counter|Histogram|Summary)\(\s*\"([a-z_]+)\"(.*?)registry", text, re.S):
            if "municipality" in m.group(2):
                found.append(f"{f.name}: {m.group(1)}")
    assert not found, found
