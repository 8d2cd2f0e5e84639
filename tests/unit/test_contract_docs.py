"""The committed JSON Schemas and AsyncAPI document are generated from the models, never by hand."""

from pathlib import Path

from clms.schema import render_all
from shared.events import EVENT_TYPES
from shared.topics import REGISTRY

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_committed_schema_files_match_the_models():
    stale = []
    for rel, content in render_all().items():
        path = DOCS / rel
        if not path.exists() or path.read_text(encoding="utf-8") != content:
            stale.append(rel)
    assert stale == [], f"docs are stale, run `make schema` (clms schema): {stale}"


def test_asyncapi_lists_every_topic_and_event_type():
    import yaml

    doc = yaml.safe_load(render_all()["asyncapi.yaml"])
    assert doc["asyncapi"].startswith("3.")
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == {s.topic.value for s in REGISTRY}
    names = {m["name"] for m in doc["components"]["messages"].values()}
    assert names == set(EVENT_TYPES)
