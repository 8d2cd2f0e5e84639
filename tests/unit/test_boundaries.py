"""The boundaries between the services, shared/, the clms command and the pure rules, as the
import-linter contracts in pyproject.toml ([tool.importlinter]) state them: checked on the real
code, and shown to break on a small tree that crosses each boundary once."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# lint-imports in a fresh interpreter whose only `shared`, `services` and `clms` are those below
# the working directory: the editable install's finder (which maps them to this checkout) is
# taken out of the import system first.
LINT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")]
sys.path.insert(0, ".")
from importlinter.cli import lint_imports
sys.exit(lint_imports(config_filename="pyproject.toml", no_cache=True, no_logo=True))
"""


def lint(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT], cwd=folder, capture_output=True, text=True, timeout=120)


def verdict(output: str, name: str) -> str | None:
    """KEPT or BROKEN, as lint-imports prints it after the contract's name."""
    words = r"\s+".join(re.escape(w) for w in name.split())  # a long name wraps
    found = re.search(words + r"\s*(KEPT|BROKEN)", output)
    return found.group(1) if found else None


def contracts() -> dict[str, str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def test_the_code_keeps_every_boundary():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in contracts().values():
        assert verdict(result.stdout, name) == "KEPT", result.stdout


def write(tree: dict[str, str], root: Path) -> None:
    for path, text in tree.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


CLEAN = {
    "shared/__init__.py": "", "shared/events.py": "import pydantic\n",
    "clms/__init__.py": "", "clms/cli.py": "import services.alpha.cli\n",
    "services/__init__.py": "",
    "services/alpha/__init__.py": "", "services/alpha/cli.py": "import shared.events\n",
    "services/alpha/rules.py": "import shared.events\n", "services/alpha/worker.py": "import aiokafka\n",
    "services/beta/__init__.py": "", "services/beta/states.py": "",
    "services/beta/views.py": "import fastapi\nimport services.beta.states\n",
}


def test_a_tree_within_the_boundaries_passes(tmp_path):
    write({**CLEAN, "pyproject.toml": (ROOT / "pyproject.toml").read_text()}, tmp_path)
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_crossing_breaks_its_contract(tmp_path):
    """One crossing per contract: a service imports another, shared/ imports a service, a
    service imports clms, and pure rules (a rules.py, and a module named like the older names
    of the rules modules) import the broker, the database driver or the web framework."""
    write({**CLEAN, "pyproject.toml": (ROOT / "pyproject.toml").read_text(),
           "services/alpha/service.py": "from services.beta import states\n",
           "shared/web.py": "import services.beta.views\n",
           "services/beta/cli.py": "from clms import cli\n",
           "clms/ops.py": "from services.beta import views\n",
           "services/alpha/rules.py": "import asyncpg\n",
           "services/beta/states.py": "import shared.kafka\n",  # indirectly: shared.kafka imports aiokafka
           "shared/kafka.py": "import aiokafka\n"}, tmp_path)
    result = lint(tmp_path)
    out = " ".join(result.stdout.split())
    assert result.returncode == 1, result.stdout + result.stderr
    for name in contracts().values():
        assert verdict(result.stdout, name) == "BROKEN", result.stdout
    assert "services.alpha.service -> services.beta.states" in out
    assert "shared.web -> services.beta.views" in out
    assert "clms.ops -> services.beta.views" in out
    assert "services.beta.cli -> clms" in out
    assert "services.alpha.rules -> asyncpg" in out
    assert "shared.kafka -> aiokafka" in out


def test_clms_offers_every_command_of_each_service_cli_app():
    """`clms` mounts each `services/<name>/cli.py`'s `app` whole: every command a service's
    entry point has is a `clms` command (`clms erase`, `clms keys rotate`, `clms officers import`...)."""
    import importlib

    import typer.main

    from clms.cli import app

    offered = typer.main.get_command(app).commands
    for cli in sorted((ROOT / "services").glob("*/cli.py")):
        service = importlib.import_module(f"services.{cli.parent.name}.cli")
        assert isinstance(getattr(service, "app", None), typer.Typer), f"{cli} has no typer `app`"
        commands = typer.main.get_command(service.app).commands
        assert commands and set(commands) <= set(offered), (cli, sorted(commands), sorted(offered))
        for name, command in commands.items():
            assert offered[name].callback is command.callback or set(getattr(command, "commands", {})) == \
                set(getattr(offered[name], "commands", {})), f"clms {name} is not {cli}'s command"
