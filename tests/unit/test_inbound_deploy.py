"""Production runs intake with its own inbound key and the agency offices' key registry (compose
and Kubernetes alike); without them intake refuses to start (tests/unit/test_inbound_protocol.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from services.intake.inbound import SenderRegistry

ROOT = Path(__file__).resolve().parents[2]


def test_compose_gives_intake_alone_the_inbound_key_and_mounts_the_registry():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    intake = services["intake"]
    assert intake["environment"]["INBOUND_JWE_PRIVATE_KEY"].startswith("${INBOUND_JWE_PRIVATE_KEY:?")
    path = intake["environment"]["INBOUND_SENDERS_FILE"]
    assert any(v.startswith("./deploy/inbound/senders.yaml:") and v.split(":")[1] == path for v in intake["volumes"])
    for name, svc in services.items():
        if name != "intake":
            assert "INBOUND_JWE_PRIVATE_KEY" not in (svc.get("environment") or {}), name
    assert SenderRegistry.from_file(ROOT / "deploy/inbound/senders.yaml").keys == {}


def test_kubernetes_gives_intake_the_key_from_its_secret_and_the_registry_from_a_configmap():
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/base/intake.yaml").read_text()) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["INBOUND_JWE_PRIVATE_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "clms-intake", "key": "INBOUND_JWE_PRIVATE_KEY"}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "inbound-senders")
    assert env["INBOUND_SENDERS_FILE"]["value"] == f"{mount['mountPath']}/senders.yaml" and mount["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == "inbound-senders")
    cm = yaml.safe_load((ROOT / "deploy/k8s/base/inbound-senders.yaml").read_text())
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert "inbound-senders.yaml" in (ROOT / "deploy/k8s/base/kustomization.yaml").read_text()
    assert yaml.safe_load(cm["data"]["senders.yaml"]) == {"senders": {}}
