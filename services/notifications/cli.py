"""`clms officers ...`: the officer directory from the command line (registered in clms/cli.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

officers_app = typer.Typer(no_args_is_help=True, add_completion=False,
                           help="Officer directory of the notifications service.")


def _settings():  # noqa: ANN202
    """The environment's settings, else the embedded stack that `make run` starts."""
    from shared.settings import Settings

    s = Settings()
    if not s.database_url:
        s = s.model_copy(update={
            "database_url": f"postgresql://postgres@127.0.0.1:{s.embedded_postgres_port}/postgres"})
    return s


@officers_app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="Roster CSV: officer_id,agency,municipality,office_id,role,"
                                              "language,email,phone,inapp,on_duty")],
    dry_run: Annotated[bool, typer.Option(help="Validate only; change nothing")] = False,
) -> None:
    """Validate a roster CSV and add or update its officers (by officer_id)."""
    from services.notifications.directory import RosterError, parse_roster
    from services.notifications.service import import_roster

    if not file.is_file():
        typer.echo(f"error: {file}: no such file", err=True)
        raise typer.Exit(2)
    try:
        officers = parse_roster(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        typer.echo(f"error: {file}: not UTF-8 text (save the roster as CSV UTF-8)", err=True)
        raise typer.Exit(2) from None
    except RosterError as exc:
        typer.echo(f"error: {file}: {len(exc.errors)} problem(s); nothing imported", err=True)
        for e in exc.errors[:50]:
            typer.echo(f"  {e}", err=True)
        raise typer.Exit(2) from None
    if dry_run:
        typer.echo(f"{file}: {len(officers)} officers valid (dry run, nothing imported)")
        return
    result = asyncio.run(import_roster(_settings(), officers))
    typer.echo(f"{file}: {result['inserted']} added, {result['updated']} updated")


@officers_app.command("list")
def list_(
    municipality: Annotated[str | None, typer.Option(help="Only this municipality slug")] = None,
    office: Annotated[str | None, typer.Option(help="Only this office id, e.g. csw.prizren")] = None,
) -> None:
    """List officers (subject, office, role, language, channels, on duty); no contact details."""
    from services.notifications.service import list_officers

    rows = asyncio.run(list_officers(_settings(), municipality=municipality, office_id=office))
    for r in rows:
        chans = ",".join(c for c, on in (("email", r["email"]), ("sms", r["phone"]), ("inapp", r["inapp"])) if on)
        typer.echo(f"{r['officer_id']:45} {r['office_id']:32} {r['role']:13} {r['language']}  "
                   f"{chans:16} {'on duty' if r['on_duty'] else ''}")


# The one entry point `clms` reaches these commands through (clms/cli.py mounts it): `clms officers ...`.
app = typer.Typer(add_completion=False)
app.add_typer(officers_app, name="officers", help="Officer directory: import a roster (CSV), list officers.")
