"""The image: multi-stage, no compilers and no root in the final stage, pinned dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def stages() -> list[list[str]]:
    out: list[list[str]] = []
    for raw in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(line)
    return out


def test_final_stage_runs_as_non_root_without_compilers():
    all_stages = stages()
    assert len(all_stages) >= 2, "multi-stage build expected"
    final = all_stages[-1]
    users = [line.split()[1] for line in final if line.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    text = "\n".join(final).lower()
    for tool in ("build-essential", "gcc", "g++", "clang", "make ", "apt-get install"):
        assert tool not in text, f"final stage installs {tool.strip()}"
    assert any(line.startswith("COPY --from=") for line in final)
    entry = [line for line in final if line.startswith("ENTRYPOINT")]
    assert entry and '"clms", "serve"' in entry[-1]


def test_build_installs_only_from_the_lock_file():
    build = "\n".join(stages()[0])
    assert "requirements.lock" in build
    installs = re.findall(r"pip install ([^\n&]+)", build)
    assert installs and all("--no-deps" in i for i in installs), installs


def test_lock_pins_every_runtime_dependency_with_a_satisfying_version():
    deps = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~*,]", version), f"unpinned: {line}"
            pins[canonicalize_name(name)] = version
    for dep in deps:
        name = canonicalize_name(dep.name)
        assert name in pins, f"{dep.name} is not in requirements.lock (run `make lock`)"
        assert dep.specifier.contains(pins[name], prereleases=True), f"{dep} vs locked {pins[name]}"
    # test-only tools stay out of the image
    for name in ("pytest", "hypothesis", "testcontainers", "schemathesis"):
        assert name not in pins


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".venv", ".clms", ".git"} <= ignored
