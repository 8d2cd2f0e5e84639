"""Generate JSON Schema for every event and an AsyncAPI 3 document from the pydantic models.

Never edited by hand: `clms schema` writes them, and a test fails when the committed files
differ from what the models generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from shared.events import EVENT_TYPES, SCHEMA_VERSION, Envelope, dataschema_for
from shared.topics import REGISTRY, Topic

# Which topic carries which event types, and which service publishes / consumes it.
TOPIC_EVENTS: dict[Topic, list[str]] = {
    Topic.agency_inbound: ["case.identified"],
    Topic.case_events: [t for t in EVENT_TYPES if t.startswith("case.")],
    Topic.referral_events: [t for t in EVENT_TYPES if t.startswith("referral.")],
    Topic.notification_events: [t for t in EVENT_TYPES if t.startswith("notification.")],
}
PUBLISHERS: dict[Topic, str] = {
    Topic.agency_inbound: "agency systems",
    Topic.case_events: "intake",
    Topic.referral_events: "referral",
    Topic.notification_events: "notifications",
    Topic.dead_letters: "every consumer",
}
CONSUMERS: dict[Topic, list[str]] = {
    Topic.agency_inbound: ["intake"],
    Topic.case_events: ["referral", "analytics"],
    Topic.referral_events: ["intake", "notifications", "analytics"],
    Topic.notification_events: ["analytics"],
    Topic.dead_letters: ["operators (clms dlq)"],
}


def event_schema(event_type: str) -> dict[str, Any]:
    """JSON Schema of the full envelope for one event type (data typed to its payload)."""
    model = EVENT_TYPES[event_type]
    data_schema = model.model_json_schema(mode="serialization")
    env = Envelope.model_json_schema(mode="serialization")
    defs = {**env.pop("$defs", {}), **data_schema.pop("$defs", {})}
    env["properties"]["type"] = {"const": event_type, "title": "Type"}
    env["properties"]["dataschema"] = {"const": dataschema_for(event_type), "title": "Dataschema"}
    env["properties"]["data"] = data_schema
    env.pop("$defs", None)
    env["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    env["$id"] = dataschema_for(event_type)
    env["title"] = f"{event_type} v{SCHEMA_VERSION}"
    if defs:
        env["$defs"] = defs
    return env


def asyncapi() -> dict[str, Any]:
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components: dict[str, Any] = {"messages": {}, "schemas": {}}
    for spec in REGISTRY:
        cid = spec.topic.value.replace("clms.", "").replace("-", "_")
        messages = {}
        for etype in TOPIC_EVENTS.get(spec.topic, []):
            mid = etype.replace(".", "_")
            components["schemas"][mid] = {"$ref": f"schemas/{etype}.json"}
            components["messages"][mid] = {
                "name": etype,
                "contentType": "application/cloudevents+json",
                "payload": {"$ref": f"#/components/schemas/{mid}"},
            }
            messages[mid] = {"$ref": f"#/components/messages/{mid}"}
        channels[cid] = {
            "address": spec.topic.value,
            "description": f"{spec.description}. Key: {spec.key}. Partitions: {spec.partitions}.",
            "messages": messages,
            "bindings": {"kafka": {"partitions": spec.partitions, "bindingVersion": "0.5.0"}},
        }
        operations[f"publish_{cid}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": f"Published by {PUBLISHERS[spec.topic]}",
        }
        operations[f"consume_{cid}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{cid}"},
            "summary": "Consumed by " + ", ".join(CONSUMERS[spec.topic]),
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "CLMS referral services events",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": "CloudEvents 1.0 (JSON structured mode) exchanged between the CLMS "
                           "services. Generated from shared/events.py by `clms schema`.",
        },
        "defaultContentType": "application/cloudevents+json",
        "channels": channels,
        "operations": operations,
        "components": components,
    }


def render_all() -> dict[str, str]:
    """Relative path under docs/ -> file content."""
    files = {
        f"schemas/{t}.json": json.dumps(event_schema(t), indent=2, sort_keys=True) + "\n"
        for t in sorted(EVENT_TYPES)
    }
    files["asyncapi.yaml"] = yaml.safe_dump(asyncapi(), sort_keys=False, allow_unicode=True)
    return files


def write_all(docs: Path) -> list[Path]:
    written = []
    for rel, content in render_all().items():
        path = docs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
