"""`make bench`: every target of issue 18 in one run on one embedded stack (the broker `make run`
uses: Apache Kafka where java and mvn answer, else Tansu; PostgreSQL; or KAFKA_BOOTSTRAP_SERVERS /
DATABASE_URL), each bare baseline from ../shared/baselines run in the same run beside our figure;
prints one table (figure, target, pass/miss, ratio to the baseline) and the CPU split per process,
and writes bench/results/latest.json.

    .venv/bin/python -m bench             # the full run (~8 minutes on a quiet 2-core machine)
    .venv/bin/python -m bench --quick     # small N, short durations (or BENCH_QUICK=1)
    .venv/bin/python -m bench --only intake,e2e

Parts: intake (req/s, p50/p99 at 32 clients vs the FastAPI+asyncpg baseline), referral and
analytics (worker events/s vs the faust baseline), notifications (referral.created/s applied by
its worker, target 1,000), e2e (police POST -> officer inbox alert at a steady 100/s for 60 s; CPU
per identification per process; the whole system idle), rebuild (analytics from 1,000,000 events;
--quick: 100,000; peak RSS), e2e-tansu (the e2e load again on an embedded Tansu, beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import analytics, e2e, intake, notifications, referral
from bench.stack import start_stack

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PARTS = ("intake", "referral", "notifications", "analytics", "e2e", "rebuild", "e2e-tansu")
console = Console(width=None if sys.stdout.isatty() else 130)

FULL = dict(intake_rounds=3, intake_duration=8.0, referral_n=3000, referral_baseline_n=10000, notifications_n=4000,
            analytics_n=20000, analytics_baseline_n=10000, e2e_rate=100.0, e2e_seconds=60.0,
            e2e_low_rate=10.0, e2e_low_seconds=20.0, e2e_drain_s=180.0, e2e_warm_s=20.0, idle_s=30.0, rebuild_n=1_000_000)
QUICK = dict(intake_rounds=1, intake_duration=4.0, referral_n=1000, referral_baseline_n=3000, notifications_n=1000,
             analytics_n=4000, analytics_baseline_n=3000, e2e_rate=100.0, e2e_seconds=15.0,
             e2e_low_rate=10.0, e2e_low_seconds=10.0, e2e_drain_s=60.0, e2e_warm_s=5.0, idle_s=10.0, rebuild_n=100_000)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gb": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "commit": commit,
            "load_avg_at_start": os.getloadavg()}  # the machine is shared: how busy it was


def row(figure: str, ours, baseline=None, ratio=None, target: str = "", ok: bool | None = None) -> dict:  # noqa: ANN001
    return {"figure": figure, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target, "pass": ok}


def _ms(v: float):  # noqa: ANN202
    return "inf (not all arrived)" if v == float("inf") else round(v)


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")


async def _e2e(stack, cfg: dict, name: str, *, low: bool = True) -> dict:  # noqa: ANN001
    phases = ([(cfg["e2e_low_rate"], cfg["e2e_low_seconds"])] if low else []) + [(cfg["e2e_rate"], cfg["e2e_seconds"])]
    log(f"{name}: whole system, " + ", then ".join(f"{r:.0f} identifications/s for {s:.0f} s" for r, s in phases))
    return await e2e.run(stack, phases=phases, drain_s=cfg["e2e_drain_s"], idle_s=cfg["idle_s"],
                         warm_s=cfg["e2e_warm_s"], log=log)


def e2e_rows(r: dict, prefix: str, *, main_only: bool = False) -> list[dict]:
    """The e2e table rows: per phase the alert latency, and for the main (last) phase the targets."""
    out = []
    for i, ph in enumerate(r["phases"]):
        main_phase = i == len(r["phases"]) - 1
        if main_only and not main_phase:
            continue
        complete = ph["missing_alerts"] == 0 and not ph["errors"]
        tag = f"{ph['rate']:.0f}/s for {ph['seconds']:.0f} s"
        if abs(ph["achieved_rate"] - ph["rate"]) > 0.05 * ph["rate"]:
            tag += f", {ph['achieved_rate']:.0f}/s achieved"
        out += [
            row(f"{prefix}e2e POST -> inbox alert p50 ms ({tag})", _ms(ph["p50_ms"]), None, None, "report"),
            row(f"{prefix}e2e POST -> inbox alert p99 ms ({tag})", _ms(ph["p99_ms"]), None, None,
                "< 1000 ms" if main_phase else "report", ph["p99_ms"] < 1000 if main_phase else None),
            row(f"{prefix}e2e alerts missing after the drain ({tag})", ph["missing_alerts"], None, None,
                "0" if main_phase else "report", complete if main_phase else None),
            row(f"{prefix}e2e s from the last inbox alert until every e-mail/SMS is sent and every consumer "
                f"has caught up ({tag})", ph.get("caught_up_s_after_last_alert"), None, None, "report"),
            row(f"{prefix}e2e CPU ms per identification, all but the mail sink ({tag})",
                ph["cpu_ms_per_identification_total"], None, None, "<= 15 ms" if main_phase else "report",
                ph["cpu_ms_per_identification_total"] <= 15 if main_phase else None),
        ]
    return out


def cpu_split(raw: dict) -> Table | None:
    """CPU per process: ms per identification in each e2e phase, and cores when idle."""
    cols: list[tuple[str, dict]] = []
    for key, label in (("e2e", ""), ("e2e_tansu", "Tansu ")):
        r = raw.get(key)
        if not r:
            continue
        cols += [(f"{label}ms/identification at {ph['achieved_rate']:.0f}/s", ph["cpu_ms_per_identification"])
                 for ph in r["phases"]]
        cols.append((f"{label}idle cores", r["idle_cpu_cores"]))
    if not cols:
        return None
    t = Table(title="CPU by process (the mail sink is not counted in the per-identification total)")
    t.add_column("process")
    for name, _ in cols:
        t.add_column(name, justify="right")
    names = list(dict.fromkeys(n for _, c in cols for n in c))
    for n in names:
        t.add_row(n, *(str(c.get(n, "")) for _, c in cols))
    return t


async def part_intake(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    log("intake: baseline and intake, alternating rounds, 32 clients")
    r = raw["intake"] = await intake.run(stack, rounds=cfg["intake_rounds"], duration=cfg["intake_duration"],
                                         warmup=1.0, concurrency=32, log=log)
    b, o = r["baseline"], r["intake"]
    return [
        row("intake identifications/s (32 clients)", round(o["rps"]), round(b["rps"]), round(r["ratio"], 2),
            ">= 0.8x baseline", r["ratio"] >= 0.8),
        row("intake p50 ms", round(o["p50_ms"], 1), round(b["p50_ms"], 1), None, "report"),
        row("intake p99 ms", round(o["p99_ms"], 1), round(b["p99_ms"], 1), None, "< 50 ms", o["p99_ms"] < 50),
    ]


async def part_referral(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    log("referral: worker, then the faust baseline")
    r = raw["referral"] = await referral.run(stack, n=cfg["referral_n"], baseline_n=cfg["referral_baseline_n"])
    return [row("referral worker events/s", round(r["referral_events_per_s"]), round(r["baseline_events_per_s"]),
                round(r["ratio"], 2), ">= 0.5x faust baseline", r["ratio"] >= 0.5)]


async def part_notifications(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    log("notifications: worker on preloaded referral.created (the faust baseline is the referral part's)")
    r = raw["notifications"] = await notifications.run(stack, n=cfg["notifications_n"], baseline_n=0)
    base = raw.get("referral", {}).get("baseline_events_per_s")
    ours = r["notifications_events_per_s"]
    return [row("notifications worker referral.created/s", round(ours), round(base) if base else None,
                round(ours / base, 2) if base else None, ">= 1,000/s", ours >= notifications.TARGET)]


async def part_analytics(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    log("analytics: faust worker fold, restart, fast rebuild, then the faust baseline")
    r = raw["analytics"] = await analytics.run(stack, n=cfg["analytics_n"], baseline_n=cfg["analytics_baseline_n"],
                                               log=log)
    return [row("analytics worker events/s", round(r["analytics_events_per_s"]), round(r["baseline_events_per_s"]),
                round(r["ratio"], 2), ">= 0.5x faust baseline", r["ratio"] >= 0.5)]


async def part_e2e(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    r = raw["e2e"] = await _e2e(stack, cfg, "e2e")
    idle = r["idle_cpu_cores_total"]
    return [*e2e_rows(r, ""),
            row(f"idle CPU cores, whole stack ({cfg['idle_s']:.0f} s, nothing to do)", idle, None, None,
                "< 0.05 core", idle < 0.05),
            row("host probe after the idle window: a bare asyncio loop waking 10 times a second, cores",
                r.get("host_wakeup_probe_cores"), None, None, "report"),
            *(row(f"peak RSS {name} MB (after e2e)", round(mb) if mb else None, None, None, "report")
              for name, mb in r["peak_rss_mb"].items())]


async def part_rebuild(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    n = cfg["rebuild_n"]
    log(f"rebuild: analytics from {n:,} events (preload, rebuild tool, service recovery)")
    # two workers split the partitions: the rebuild tool and the worker's recovery per share
    r = raw["rebuild"] = await analytics.run_rebuild(stack, n=n, shares=2, log=log)
    scale = 1_000_000 / r["events"]
    what = "a worker's share of 2" if r.get("shares", 1) > 1 else "one worker, all partitions"
    share = r["total_s"] * scale
    extrapolated = "" if r["events"] >= 1_000_000 else f", extrapolated from {r['events']:,}"
    return [
        row(f"analytics rebuild of 1M events s ({what}{extrapolated})", round(share), None, None,
            "< 60 s (a worker's share)", share < 60),
        row("peak RSS analytics rebuild tool MB", round(r["rebuild_peak_rss_mb"]), None, None, "< 300 MB",
            r["rebuild_peak_rss_mb"] < 300),
        row(f"peak RSS analytics worker MB after recovering {r['events']:,}", round(r["service_peak_rss_mb"]),
            None, None, "< 300 MB", r["service_peak_rss_mb"] < 300),
    ]


async def part_e2e_tansu(stack, cfg: dict, raw: dict) -> list[dict]:  # noqa: ANN001
    log("e2e-tansu: a second stack on an embedded Tansu, the same load")
    tansu_stack = start_stack(durable_postgres=True, broker="tansu")
    try:
        r = raw["e2e_tansu"] = await _e2e(tansu_stack, cfg, "e2e-tansu", low=False)
    finally:
        tansu_stack.close()
    return e2e_rows(r, "Tansu: ", main_only=True)


PART_RUNNERS = {"intake": part_intake, "referral": part_referral, "notifications": part_notifications,
                "analytics": part_analytics, "e2e": part_e2e, "rebuild": part_rebuild, "e2e-tansu": part_e2e_tansu}


async def run_all(cfg: dict, parts: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Every part in order on one stack; a part that fails leaves a 'not measured' row (a miss)
    and the others still run."""
    rows: list[dict] = []
    raw: dict = {}
    stack = start_stack(durable_postgres=True)
    log(f"stack: broker {stack.bootstrap}, PostgreSQL {stack.admin_url.rsplit('@', 1)[-1]}")
    try:
        for name in PARTS:
            if name not in parts:
                continue
            try:
                rows += await PART_RUNNERS[name](stack, cfg, raw)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - the other parts still run
                log(f"[red]{name}: not measured[/] ({type(exc).__name__}: {str(exc)[-500:]})")
                raw.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                rows.append(row(f"{name}: not measured ({type(exc).__name__}; see the log)", None, None, None,
                                "a figure", False))
            # best effort: a part's databases and topics are its scratch space, not the next part's load
            with contextlib.suppress(Exception):
                await stack.drop_bench_databases()
            with contextlib.suppress(Exception):
                await stack.delete_bench_topics()
    finally:
        stack.close()
    return rows, raw


def render(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("figure", "ours", "baseline", "ratio", "target", "pass/miss"):
        t.add_column(col, justify="left" if col in ("figure", "target") else "right")
    for r in rows:
        verdict = "" if r["pass"] is None else ("[green]pass[/]" if r["pass"] else "[red]MISS[/]")
        t.add_row(r["figure"], *("" if r[k] is None else str(r[k]) for k in ("ours", "baseline", "ratio")),
                  r["target"], verdict)
    return t


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                   help="small N and short durations (also BENCH_QUICK=1)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--out", default=str(RESULTS / "latest.json"))
    args = p.parse_args()
    parts = tuple(x for x in args.only.split(",") if x) or PARTS
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    cfg = QUICK if args.quick else FULL
    info = machine()
    log(f"{'quick' if args.quick else 'full'} run of {', '.join(parts)} on {info['nproc']} x {info['cpu']}, "
        f"{info['ram_gb']} GB RAM")
    started = time.perf_counter()
    rows, raw = asyncio.run(run_all(cfg, parts))
    elapsed = time.perf_counter() - started
    split = cpu_split(raw)
    if split is not None:
        console.print(split)
    console.print(render(rows, f"CLMS benchmarks ({'quick' if args.quick else 'full'}, {elapsed / 60:.1f} min, "
                               f"commit {info['commit']})"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(), "quick": args.quick,
                               "load_avg_at_end": os.getloadavg(),
                               "parts": parts, "config": cfg, "machine": info, "elapsed_s": elapsed,
                               "rows": rows, "raw": raw}, indent=2, default=str))
    console.print(f"results written to {out}")
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
