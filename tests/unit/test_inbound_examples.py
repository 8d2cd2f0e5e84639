"""The README's two examples of how an agency system publishes an identification (Python with
jwcrypto, and the command line with the `jose` tool) run as they stand in the README, and intake
opens what they produce (issue 15: "a Python and a command-line example")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import date
from pathlib import Path

import pytest

from shared.inbound import dev_sender_key
from shared.settings import Settings
from services.intake.inbound import InboundGate, public_key
from services.intake.service import parse_inbound

ROOT = Path(__file__).resolve().parents[2]
PERSONAL = {"given_name": "Arbër", "family_name": "Krasniqi", "date_of_birth": "2014-03-09",
            "guardian": {"name": "Shpresa Krasniqi", "relationship": "mother", "phone": "+383 44 123 456"},
            "notes": "seen near the bus station"}


def block(lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Agency systems"):text.index("## Privacy")]
    found = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    assert len(found) == 1, f"one ```{lang} block in the README's Agency systems section"
    return found[0]


def event() -> dict:
    child = {k: v for k, v in PERSONAL.items() if k != "notes"}
    return {"specversion": "1.0", "id": "kp-prizren-000124", "source": "police/prizren",
            "type": "identification.submitted", "reportedby": "police.prizren.officer17",
            "data": {"municipality": "prizren", "identified_on": date.today().isoformat(),
                     "child": {**child, "sex": "male", "community": "roma"},
                     "work": {"sector": "scrap_metal_waste", "activity": "scrap_collection"},
                     "notes": PERSONAL["notes"]}}


def opens(raw: bytes) -> None:
    settings = Settings(_env_file=None, CLMS_ENV="test")
    for value in ("Krasniqi", "Shpresa", "123 456", "2014-03-09", "bus station"):
        assert value.encode() not in raw
    env, request = parse_inbound(raw, gate=InboundGate.build(settings))
    assert env.source == "police/prizren"
    assert request.child.family_name == "Krasniqi" and request.child.guardian.phone == "+383 44 123 456"
    assert request.notes == "seen near the bus station" and request.child.date_of_birth.isoformat() == "2014-03-09"


def test_the_python_example_produces_what_intake_opens():
    scope: dict = {}
    exec(compile(block("python"), "README.md (Python example)", "exec"), scope)  # noqa: S102
    settings = Settings(_env_file=None, CLMS_ENV="test")
    office = dev_sender_key("police/prizren").export(private_key=True, as_dict=True)
    opens(scope["agency_message"](event(), public_key(settings), office))


@pytest.mark.skipif(shutil.which("jose") is None, reason="the `jose` command (apt-get install jose) is not installed")
def test_the_command_line_example_produces_what_intake_opens(tmp_path):
    settings = Settings(_env_file=None, CLMS_ENV="test")
    (tmp_path / "intake.jwk").write_text(json.dumps(public_key(settings)))
    (tmp_path / "office.jwk").write_text(dev_sender_key("police/prizren").export(private_key=True))
    (tmp_path / "personal.json").write_text(json.dumps(PERSONAL, ensure_ascii=False))
    ev = event()
    for k in ("given_name", "family_name", "date_of_birth", "guardian"):
        ev["data"]["child"].pop(k)
    ev["data"].pop("notes")
    ev["data"]["personal"] = "@PERSONAL@"
    (tmp_path / "event.json").write_text(json.dumps(ev))
    lines = [ln for ln in block("sh").splitlines()
             if not ln.startswith(("clms inbound-key", "kcat "))]  # the key is written above; no publishing
    assert len(lines) == 3, lines
    subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=tmp_path, check=True, timeout=60)
    opens((tmp_path / "message.jws").read_bytes())
