"""The `clms` command: development stack, tokens, topics, schemas and operator tools."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console()
err = Console(stderr=True)


def cli_settings() -> Settings:
    """Settings for operator commands: the environment, else the embedded stack `make run` starts."""
    s = Settings()
    updates = {}
    if not s.kafka_bootstrap_servers:
        updates["kafka_bootstrap_servers"] = f"127.0.0.1:{s.embedded_kafka_port}"
    if not s.database_url:
        updates["database_url"] = f"postgresql://postgres@127.0.0.1:{s.embedded_postgres_port}/postgres"
    return s.model_copy(update=updates) if updates else s


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
    services: Annotated[str, typer.Option(help="Comma-separated services to start")] = "intake,referral,notifications,analytics",
) -> None:
    """Start the embedded broker and database and every service (what `make run` does)."""
    from clms.dev import run_dev

    raise typer.Exit(run_dev(Settings(), services=tuple(s.strip() for s in services.split(",") if s.strip())))


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="intake, referral, notifications or analytics")],
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

    if agency == "coordinator" and sub is None:
        sub = f"coordinator.{municipality}"
    try:
        typer.echo(mint_token(Settings(), sub=sub or f"{agency}.{municipality}.duty", agency=agency,
                              municipality=municipality, roles=role, ttl_s=ttl))
    except ValidationError as exc:
        first = exc.errors()[0]
        fail(f"{'.'.join(map(str, first['loc']))}: {first['msg'].removeprefix('Value error, ')}")


@app.command()
def topics(
    create: Annotated[bool, typer.Option("--create", help="Declare missing topics first")] = False,
) -> None:
    """List every topic with its partitions and end offsets (`--create` declares missing ones)."""
    from shared.kafka import ensure_topics, make_admin, make_consumer
    from shared.topics import REGISTRY, Topics

    settings = cli_settings()

    async def run() -> Table:
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
        table = Table(title=f"topics on {settings.kafka_bootstrap_servers}")
        for col in ("topic", "partitions", "end offsets", "messages", "key"):
            table.add_column(col)
        try:
            from aiokafka import TopicPartition

            for spec in REGISTRY:
                name = names.name(spec.topic)
                if name not in existing:
                    table.add_row(name, "[red]missing[/]", "", "", spec.key)
                    continue
                parts = consumer.partitions_for_topic(name) or set()
                if not parts:
                    await consumer._client.force_metadata_update()
                    parts = consumer.partitions_for_topic(name) or set()
                tps = [TopicPartition(name, p) for p in sorted(parts)]
                ends = await consumer.end_offsets(tps) if tps else {}
                offs = [ends[tp] for tp in tps]
                table.add_row(name, str(len(tps)), " ".join(map(str, offs)), str(sum(offs)), spec.key)
        finally:
            await stop_quietly(consumer)
        return table

    console.print(asyncio.run(run()))


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="Folder to write into")] = Path("docs"),
) -> None:
    """Write JSON Schema for every event and an AsyncAPI 3 document, generated from the models."""
    from clms.schema import write_all

    for path in write_all(out):
        console.print(f"wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
