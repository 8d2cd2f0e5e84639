"""The `clms` command: development stack, tokens, topics, schemas and operator tools."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.settings import Environment, Settings, cli_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()
err = Console(stderr=True)


async def stop_quietly(consumer) -> None:  # noqa: ANN001
    """Stop a group-less consumer; aiokafka 0.14 can raise CancelledError from its no-group
    coordinator when stopped right after start."""
    import contextlib

    with contextlib.suppress(asyncio.CancelledError):
        await consumer.stop()


def fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


@app.command()
def dev(
    services: Annotated[str, typer.Option(help="Comma-separated services to start")] = "intake,referral,notifications,analytics,workspace",
) -> None:
    """Start the embedded broker and database and every service (what `make run` does)."""
    from clms.dev import run_dev

    raise typer.Exit(run_dev(Settings(), services=tuple(s.strip() for s in services.split(",") if s.strip())))


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="intake, referral, notifications, analytics or workspace")],
) -> None:
    """Run one service (its API and, where it has one, its worker) in this process: the container entrypoint."""
    import importlib.util
    import runpy

    from clms.dev import SERVICES

    if service not in SERVICES:
        fail(f"unknown service {service!r}; choose one of {', '.join(SERVICES)}")
    if importlib.util.find_spec(f"services.{service}.__main__") is None:
        fail(f"service {service!r} has no entry point yet (services/{service}/__main__.py)")
    runpy.run_module(f"services.{service}", run_name="__main__")


@app.command()
def token(
    agency: Annotated[str, typer.Option(help="police, csw, education, labour_inspectorate, prosecution, ngo, coordinator")],
    municipality: Annotated[str, typer.Option(help="Municipality slug, e.g. prizren")],
    role: Annotated[list[str], typer.Option(help="Role (repeatable), e.g. reporter, caseworker")] = [],  # noqa: B006
    sub: Annotated[str | None, typer.Option(help="Subject; default <agency>.<municipality>.duty")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds")] = 12 * 3600,
) -> None:
    """Print a development JWT (HS256, signed with JWT_SECRET)."""
    from pydantic import ValidationError

    from shared.auth import mint_token

    settings = Settings()
    if settings.environment is Environment.production:
        fail("`clms token` refuses to run with CLMS_ENV=production: production tokens come from the OIDC "
             "issuer (OIDC_JWKS_URL); mint development tokens only in development or tests")
    if agency == "coordinator" and sub is None:
        sub = f"coordinator.{municipality}"
    try:
        typer.echo(mint_token(settings, sub=sub or f"{agency}.{municipality}.duty", agency=agency,
                              municipality=municipality, roles=role, ttl_s=ttl))
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"{'.'.join(map(str, first['loc']))}: {first['msg'].removeprefix('Value error, ')}")


JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts)")]


@app.command()
def topics(
    create: Annotated[bool, typer.Option("--create", help="Declare missing topics first")] = False,
    as_json: JsonOption = False,
) -> None:
    """List every topic with its partitions and end offsets (`--create` declares missing ones)."""
    from clms.output import emit
    from clms.reports import TopicInfo, topics_report
    from shared.kafka import ensure_topics, make_admin, make_consumer
    from shared.topics import REGISTRY, Topics

    settings = cli_settings()

    async def run() -> list[TopicInfo]:
        names = Topics(settings.topic_prefix)
        if create:
            try:
                created = await ensure_topics(settings)
            except Exception as exc:  # noqa: BLE001
                fail(f"cannot declare topics on {settings.kafka_bootstrap_servers} ({type(exc).__name__}: {exc})")
            err.print(f"declared {len(created)} topic(s): {', '.join(created) or 'all existed'}")
        admin = make_admin(settings)
        try:
            await admin.start()
        except Exception as exc:  # noqa: BLE001
            fail(f"cannot reach the broker at {settings.kafka_bootstrap_servers} ({type(exc).__name__}). "
                 "Is `make run` running, or KAFKA_BOOTSTRAP_SERVERS set?")
        try:
            existing = set(await admin.list_topics())
        finally:
            await admin.close()
        consumer = make_consumer(settings, group=None)
        await consumer.start()
        found = []
        try:
            from aiokafka import TopicPartition

            for spec in REGISTRY:
                name = names.name(spec.topic)
                if name not in existing:
                    found.append(TopicInfo(name, spec.key))
                    continue
                parts = consumer.partitions_for_topic(name) or set()
                if not parts:
                    await consumer._client.force_metadata_update()
                    parts = consumer.partitions_for_topic(name) or set()
                tps = [TopicPartition(name, p) for p in sorted(parts)]
                ends = await consumer.end_offsets(tps) if tps else {}
                found.append(TopicInfo(name, spec.key, len(tps), tuple(ends[tp] for tp in tps)))
        finally:
            await stop_quietly(consumer)
        return found

    sections, document = topics_report(settings.kafka_bootstrap_servers or "", asyncio.run(run()))
    emit(sections, document=document, as_json=as_json, console=console)


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="Folder to write into")] = Path("docs"),
) -> None:
    """Write JSON Schema for every event and an AsyncAPI 3 document, generated from the models."""
    from clms.schema import write_all

    for path in write_all(out):
        console.print(f"wrote {path}")


# --- operations -------------------------------------------------------------------------------

dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters: what failed, why, and replaying them after a fix.")
app.add_typer(dlq_app, name="dlq")


def _broker_or_fail(settings: Settings, what):  # noqa: ANN001, ANN202
    try:
        return asyncio.run(what)
    except (ValueError, RuntimeError) as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - a sentence with the fix, not a traceback
        fail(f"cannot reach the broker or database ({type(exc).__name__}: {exc}). "
             "Is `make run` running, or are KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL set?")


@dlq_app.command("list")
def dlq_list(
    show: Annotated[int, typer.Option(help="Also list the newest N dead letters")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Dead letters by reason: count, oldest, original topics."""
    from clms.ops import dead_letters, summarise
    from clms.output import emit
    from clms.reports import dlq_report

    settings = cli_settings()
    letters = _broker_or_fail(settings, dead_letters(settings))
    sections, document = dlq_report(letters, summarise(letters), show=max(0, show))
    emit(sections, document=document, as_json=as_json, console=console)


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[str | None, typer.Option(help="Replay every dead letter with this reason")] = None,
    id: Annotated[list[str], typer.Option("--id", help="partition:offset on the dead-letter topic, or the event id")] = [],  # noqa: B006
    fixed: Annotated[Path | None, typer.Option(help="A corrected envelope (JSON file) to publish instead of the original, with one --id; for an inbound identification, the agency's re-signed JWS")] = None,
    force: Annotated[bool, typer.Option(help="Replay again even if replayed before")] = False,
) -> None:
    """Re-publish dead letters to their original topic after a fix, recording each replay and who
    ran it (the Kafka principal, else the OS user). Only dead letters whose headers check out are
    replayed: a registry topic read by the named consumer group, the original still there."""
    from clms.ops import replay_dead_letters

    if reason is None and not id:
        fail("say what to replay: --reason REASON or --id ID (see `clms dlq list --show 20`)")
    settings = cli_settings()
    value = fixed.read_bytes() if fixed else None
    result = _broker_or_fail(settings, replay_dead_letters(
        settings, reason=reason, ids=id, fixed_value=value, force=force))
    console.print(f"replayed {len(result.replayed)} as {result.operator}: {' '.join(result.replayed)}")
    if result.skipped_already_replayed:
        console.print(f"skipped (replayed before; --force to repeat): {' '.join(result.skipped_already_replayed)}")
    if result.not_found:
        console.print(f"[yellow]not found[/]: {' '.join(result.not_found)}")
    for letter_id, why in result.refused:
        console.print(f"[yellow]refused[/] {letter_id}: {why}")


@app.command()
def lag(as_json: JsonOption = False) -> None:
    """Consumer lag per consumer group and partition."""
    from clms.ops import consumer_lag
    from clms.output import emit
    from clms.reports import lag_report

    settings = cli_settings()
    sections, document = lag_report(_broker_or_fail(settings, consumer_lag(settings)))
    emit(sections, document=document, as_json=as_json, console=console)


@app.command()
def trace(
    case_id: Annotated[str, typer.Argument(help="The case id")],
    as_json: JsonOption = False,
) -> None:
    """The story of one case across every topic: events in order and the service behind each."""
    import uuid as _uuid

    from clms.ops import trace_case
    from clms.output import emit
    from clms.reports import trace_report

    try:
        _uuid.UUID(case_id)
    except ValueError:
        fail(f"{case_id!r} is not a case id (a UUID like the one POST /v1/identifications returned)")
    settings = cli_settings()
    lines = _broker_or_fail(settings, trace_case(settings, case_id))
    if not lines:
        fail(f"no events found for case {case_id}")
    sections, document = trace_report(case_id, lines)
    emit(sections, document=document, as_json=as_json, console=console)


@app.command()
def demo(
    rate: Annotated[float, typer.Option(help="Identifications per second")] = 5.0,
    duration: Annotated[float, typer.Option(help="Seconds to run")] = 20.0,
    seed: Annotated[int | None, typer.Option(help="Random seed (repeatable runs)")] = None,
    url: Annotated[str | None, typer.Option(help="Intake base URL; default http://CLMS_HOST:INTAKE_PORT")] = None,
) -> None:
    """Post realistic synthetic identifications across the 38 municipalities (weighted by population)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from clms.demo import run_demo

    if rate <= 0 or duration <= 0:
        fail("--rate and --duration must be positive")
    settings = cli_settings()
    base = url or f"http://{settings.host}:{settings.intake_port}"
    total = max(1, int(rate * duration))
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task(f"posting to {base}", total=total)
        result = asyncio.run(run_demo(settings, base_url=base, rate=rate, duration_s=duration, seed=seed,
                                      on_progress=lambda: progress.advance(task)))
    table = Table(title="demo summary")
    table.add_column("what")
    table.add_column("value")
    table.add_row("sent", str(result.sent))
    table.add_row("answers", ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items())) or "-")
    if result.errors:
        table.add_row("[red]errors[/]", ", ".join(f"{k}: {v}" for k, v in result.errors.items()))
    table.add_row("latency p50 / p99", f"{result.percentile(0.5):.0f} ms / {result.percentile(0.99):.0f} ms")
    table.add_row("top municipalities", ", ".join(f"{m} {n}" for m, n in result.municipalities.most_common(5)))
    console.print(table)
    if result.errors and not result.statuses:
        fail(f"the intake API at {base} did not answer; is `make run` running?")


@app.command()
def status(as_json: JsonOption = False) -> None:
    """One screen: every service's health, consumer lag, dead letters and outbox backlog."""
    import httpx

    from clms.dev import SERVICE_SCHEMAS, SERVICES
    from clms.ops import consumer_lag, dead_letters
    from clms.output import emit
    from clms.reports import OutboxBacklog, ServiceHealth, status_report

    settings = cli_settings()

    async def gather() -> tuple[list, list, list, list]:
        health = []
        async with httpx.AsyncClient(timeout=2) as client:
            for name in SERVICES:
                url = f"http://{settings.host}:{getattr(settings, f'{name}_port')}"
                try:
                    r = await client.get(f"{url}/readyz")
                    checks = r.json().get("checks", {})
                    health.append(ServiceHealth(name, url, "ready" if r.status_code == 200 else "not ready",
                                                checks={k: str(v) for k, v in checks.items()}))
                except (httpx.HTTPError, ValueError) as exc:
                    health.append(ServiceHealth(name, url, "down", error=type(exc).__name__))
        try:
            lag = await consumer_lag(settings)
            dlq = await dead_letters(settings)
        except Exception as exc:  # noqa: BLE001
            fail(f"cannot reach the broker at {settings.kafka_bootstrap_servers} ({type(exc).__name__})")
        backlog: list[OutboxBacklog] = []
        try:
            import asyncpg

            from shared.outbox import backlog as outbox_backlog

            conn = await asyncpg.connect(settings.require_database(), timeout=3)
            try:
                for schema in SERVICE_SCHEMAS.values():
                    try:
                        b = await outbox_backlog(conn, schema=schema)
                        backlog.append(OutboxBacklog(schema, b["rows"], b["oldest_age_s"]))
                    except asyncpg.UndefinedTableError:
                        backlog.append(OutboxBacklog(schema, error="no schema yet"))
            finally:
                await conn.close()
        except Exception as exc:  # noqa: BLE001
            backlog.append(OutboxBacklog("database", error=f"unreachable ({type(exc).__name__})"))
        return health, lag, dlq, backlog

    health, lag, dlq, backlog = asyncio.run(gather())
    sections, document = status_report(health, lag, len(dlq), backlog)
    emit(sections, document=document, as_json=as_json, console=console)


# --- service operator commands (each service owns its own; registered here) ----------------------

def _register_service_commands() -> None:
    from services.intake.cli import app as intake_commands
    from services.notifications.cli import officers_app

    app.add_typer(intake_commands)  # erase, inbound-key, keys (at the top level: no group name)
    app.add_typer(officers_app, name="officers", help="Officer directory: import a roster (CSV), list officers.")


_register_service_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
