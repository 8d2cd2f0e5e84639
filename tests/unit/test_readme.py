"""The README documents every setting: a variable added to `Settings` without a row fails here."""

from pathlib import Path

from shared.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_has_a_row_in_the_readme_configuration_table():
    text = README.read_text()
    missing = [f.alias for f in Settings.model_fields.values() if f"| `{f.alias}` |" not in text]
    assert not missing, f"add these settings to the README configuration table: {missing}"


def test_readme_names_the_two_commands_and_how_to_wipe_data():
    text = README.read_text()
    for needle in ("make run", "make test", "make clean-data", ".clms/pgdata", "KAFKA_BOOTSTRAP_SERVERS"):
        assert needle in text, needle
