"""Operator commands of intake: `app`, the one entry point clms/cli.py mounts (at the top level,
so they read `clms erase`, `clms inbound-key`, `clms keys status|rotate`).

- `erase CASE_ID`: crypto-erasure of one case (its data key is destroyed; see service.erase_case);
- `inbound-key`: intake's public key for agency systems (or a new private key, or a development sender key);
- `keys status|rotate`: master keys and the online re-wrapping of data keys.
"""

from __future__ import annotations

import asyncio
import getpass
import uuid
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Intake operations: crypto-erasure, inbound key, master keys.")


def _settings():  # noqa: ANN202 - the CLI's settings (environment, else the embedded stack)
    from shared.settings import operator_settings

    return operator_settings()


async def _erase(case_id: uuid.UUID, operator: str):  # noqa: ANN202
    from shared.db import create_pool
    from shared.events import AgencyType
    from services.intake import service

    settings = _settings()
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        actor = service.Actor(sub=operator, agency=AgencyType.coordinator, municipality="*", roles=("operator",),
                              channel="cli")
        return await service.erase_case(pool, case_id=case_id, actor=actor)
    finally:
        await pool.close()


@app.command("erase")
def erase(
    case_id: Annotated[str, typer.Argument(help="The case id (UUID) whose personal data is to be erased")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")] = False,
    operator: Annotated[str | None, typer.Option(help="Who erases (recorded in the audit trail); "
                                                      "default operator.<login name>")] = None,
) -> None:
    """Crypto-erase one case: destroy its data key so its names, birth date, guardian contact and
    notes can never be decrypted again (also from backups). Non-personal facts stay for statistics."""
    from services.intake import service

    try:
        cid = uuid.UUID(case_id)
    except ValueError:
        typer.echo(f"error: {case_id!r} is not a case id (a UUID such as 0b6c...-...)", err=True)
        raise typer.Exit(2) from None
    if not yes:
        typer.confirm(f"Erase the personal data of case {cid} for good?", abort=True)
    who = operator or f"operator.{getpass.getuser()}"
    try:
        done = asyncio.run(_erase(cid, who))
    except service.CaseNotFound:
        typer.echo(f"error: no case {cid} in the intake database", err=True)
        raise typer.Exit(1) from None
    except (OSError, RuntimeError) as exc:
        typer.echo(f"error: cannot reach the intake database ({type(exc).__name__}: {exc}); "
                   "is `make run` running or DATABASE_URL set?", err=True)
        raise typer.Exit(2) from None
    note = " (it had been erased before; nothing left to erase)" if done.already else ""
    typer.echo(f"case {cid}: personal data erased, data key destroyed at {done.erased_at.isoformat()}{note}")


keys_app = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="Master keys of intake: status and online rotation of the wrapped data keys.")


async def _keys(rotate: bool, batch: int):  # noqa: ANN202
    from shared.db import create_pool
    from services.intake import service
    from services.intake.crypto import CaseCipher

    settings = _settings()
    cipher = CaseCipher.from_settings(settings)
    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        if rotate:
            return await service.rotate_keys(pool, cipher, batch=batch)
        return await service.key_status(pool, cipher)
    finally:
        await pool.close()


def _print_keys(done, *, rotated: bool) -> None:  # noqa: ANN001
    if rotated:
        typer.echo(f"re-wrapped {done.rewrapped} data key(s) under master key {done.newest}")
    for kid, n in sorted(done.by_kid.items()):
        mark = " (newest)" if kid == done.newest else (" (NOT CONFIGURED)" if kid in done.unknown else "")
        typer.echo(f"{kid}{mark}: {n} data key(s)")
    old = {k: n for k, n in done.by_kid.items() if k != done.newest}
    if done.unknown:
        typer.echo(f"{sum(done.unknown.values())} data key(s) are wrapped by a master key that is not in "
                   "ENCRYPTION_MASTER_KEYS: add it back (kid:key), then run `clms keys rotate` again", err=True)
    elif not old:
        typer.echo("every data key is wrapped by the newest master key: older master keys can be removed "
                   "from ENCRYPTION_MASTER_KEYS")


@keys_app.command("status")
def keys_status() -> None:
    """How many data keys each master key (by key id) wraps."""
    done = asyncio.run(_keys(False, 0))
    _print_keys(done, rotated=False)
    raise typer.Exit(1 if done.unknown else 0)


@keys_app.command("rotate")
def keys_rotate(
    batch: Annotated[int, typer.Option(min=1, help="Data keys re-wrapped per transaction")] = 200,
) -> None:
    """Re-wrap every data key with the newest master key (the last kid:key of ENCRYPTION_MASTER_KEYS),
    online. Put the new key last on every intake replica first; remove the old one after this run."""
    done = asyncio.run(_keys(True, batch))
    _print_keys(done, rotated=True)
    raise typer.Exit(1 if done.unknown else 0)


app.add_typer(keys_app, name="keys", help="Intake master keys: status, online rotation (clms keys rotate).")


@app.command("inbound-key")
def inbound_key(
    generate: Annotated[bool, typer.Option("--generate", help=(
        "Print a NEW private key for INBOUND_JWE_PRIVATE_KEY (keep it secret) instead of the public key"))] = False,
    dev_sender: Annotated[str | None, typer.Option("--dev-sender", metavar="AGENCY/MUNICIPALITY", help=(
        "Print the development signing key (private JWK) of an agency office, e.g. police/prizren; "
        "accepted only outside production and without INBOUND_SENDERS_FILE"))] = None,
) -> None:
    """Print intake's public key (JWK) that agency systems encrypt the personal part of an inbound
    identification to (JWE, ECDH-ES + A256GCM). README: "Agency systems"."""
    import json

    from pydantic import ValidationError

    from shared.settings import Environment, Settings

    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"error: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(2) from None
    if generate:
        from jwcrypto import jwk

        key = jwk.JWK.generate(kty="EC", crv="P-256")
        typer.echo(key.export(private_key=True))
        return
    if dev_sender is not None:
        from shared.inbound import dev_sender_key

        if settings.environment is Environment.production:
            typer.echo("error: development sender keys are public knowledge and refused with CLMS_ENV=production; "
                       "each agency office generates its own key and registers the public part in "
                       "INBOUND_SENDERS_FILE", err=True)
            raise typer.Exit(2)
        typer.echo(dev_sender_key(dev_sender).export(private_key=True))
        return
    from services.intake.inbound import public_key

    try:
        typer.echo(json.dumps(public_key(settings)))
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


__all__ = ["app"]
