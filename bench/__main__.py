"""`make bench`: every benchmark in one run on one embedded stack (Tansu + PostgreSQL, started
once, or KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL), each bare baseline from ../shared/baselines run
in the same run beside our figure; prints the table and writes bench/results/latest.json.

    .venv/bin/python -m bench             # the full run (~10-15 minutes on 2 cores)
    .venv/bin/python -m bench --quick     # small N, short durations (or BENCH_QUICK=1)
    .venv/bin/python -m bench --only intake,e2e

Parts: intake (req/s, p50/p99 at 32 clients vs the FastAPI+asyncpg baseline), referral and
analytics (worker events/s vs the faust baseline), notifications (referral.created/s applied by
its worker, target 1,000), e2e (police POST -> officer inbox alert at a steady 100/s), rebuild
(analytics from 1,000,000 events; --quick: 100,000) and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
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
PARTS = ("intake", "referral", "notifications", "analytics", "e2e", "rebuild")
console = Console(width=None if sys.stdout.isatty() else 130)

FULL = dict(intake_rounds=3, intake_duration=8.0, referral_n=3000, referral_baseline_n=10000, notifications_n=4000,
            analytics_n=20000, analytics_baseline_n=10000, e2e_rate=100.0, e2e_seconds=60.0,
            e2e_low_rate=10.0, e2e_low_seconds=20.0, e2e_drain_s=180.0, rebuild_n=1_000_000)
QUICK = dict(intake_rounds=1, intake_duration=4.0, referral_n=1000, referral_baseline_n=3000, notifications_n=1000,
             analytics_n=4000, analytics_baseline_n=3000, e2e_rate=100.0, e2e_seconds=15.0,
             e2e_low_rate=10.0, e2e_low_seconds=10.0, e2e_drain_s=60.0, rebuild_n=100_000)


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
            "python": platform.python_version(), "commit": commit}


def row(figure: str, ours, baseline=None, ratio=None, target: str = "", ok: bool | None = None) -> dict:  # noqa: ANN001
    return {"figure": figure, "ours": ours, "baseline": baseline, "ratio": ratio, "target": target, "pass": ok}


def _ms(v: float):  # noqa: ANN202
    return "inf (not all arrived)" if v == float("inf") else round(v)


def log(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")


async def run_all(cfg: dict, parts: tuple[str, ...]) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    raw: dict = {}
    stack = start_stack(durable_postgres=True)
    log(f"stack: broker {stack.bootstrap}, PostgreSQL {stack.admin_url.rsplit('@', 1)[-1]}")
    try:
        if "intake" in parts:
            log("intake: baseline and intake, alternating rounds, 32 clients")
            r = await intake.run(stack, rounds=cfg["intake_rounds"], duration=cfg["intake_duration"], warmup=1.0,
                                 concurrency=32, log=log)
            raw["intake"] = r
            b, o = r["baseline"], r["intake"]
            rows += [
                row("intake identifications/s (32 clients)", round(o["rps"]), round(b["rps"]), round(r["ratio"], 2),
                    f">= {intake.TARGET_RATIO}x baseline", r["ratio"] >= intake.TARGET_RATIO),
                row("intake p50 ms", round(o["p50_ms"], 1), round(b["p50_ms"], 1), None, "report"),
                row("intake p99 ms", round(o["p99_ms"], 1), round(b["p99_ms"], 1), None,
                    f"< {intake.TARGET_P99_MS} ms", o["p99_ms"] < intake.TARGET_P99_MS),
            ]
        if "referral" in parts:
            log("referral: worker, then the faust baseline")
            r = await referral.run(stack, n=cfg["referral_n"], baseline_n=cfg["referral_baseline_n"])
            raw["referral"] = r
            rows.append(row("referral worker events/s", round(r["referral_events_per_s"]),
                            round(r["baseline_events_per_s"]), round(r["ratio"], 2), ">= 0.5x faust baseline",
                            r["ratio"] >= 0.5))
        if "notifications" in parts:
            log("notifications: worker on preloaded referral.created (the faust baseline is the referral part's)")
            r = await notifications.run(stack, n=cfg["notifications_n"], baseline_n=0)
            raw["notifications"] = r
            base = raw.get("referral", {}).get("baseline_events_per_s")
            ours = r["notifications_events_per_s"]
            rows.append(row("notifications worker referral.created/s", round(ours), round(base) if base else None,
                            round(ours / base, 2) if base else None, ">= 1,000/s", ours >= notifications.TARGET))
        if "analytics" in parts:
            log("analytics: faust worker fold, restart, fast rebuild, then the faust baseline")
            r = await analytics.run(stack, n=cfg["analytics_n"], baseline_n=cfg["analytics_baseline_n"], log=log)
            raw["analytics"] = r
            rows.append(row("analytics worker events/s", round(r["analytics_events_per_s"]),
                            round(r["baseline_events_per_s"]), round(r["ratio"], 2), ">= 0.5x faust baseline",
                            r["ratio"] >= 0.5))
        if "e2e" in parts:
            phases = [(cfg["e2e_low_rate"], cfg["e2e_low_seconds"]), (cfg["e2e_rate"], cfg["e2e_seconds"])]
            log("e2e: whole system, " + ", then ".join(f"{r:.0f} identifications/s for {s:.0f} s" for r, s in phases))
            r = await e2e.run(stack, phases=phases, drain_s=cfg["e2e_drain_s"], log=log)
            raw["e2e"] = r
            for i, ph in enumerate(r["phases"]):
                complete = ph["missing_alerts"] == 0 and not ph["errors"]
                main_phase = i == len(r["phases"]) - 1
                tag = f"{ph['achieved_rate']:.0f}/s for {ph['seconds']:.0f} s"
                rows += [
                    row(f"e2e POST -> inbox alert p50 ms ({tag})", _ms(ph["p50_ms"]), None, None, "report"),
                    row(f"e2e POST -> inbox alert p99 ms ({tag})", _ms(ph["p99_ms"]), None, None,
                        "< 1000 ms, no loss" if main_phase else "report",
                        (ph["p99_ms"] < 1000 and complete) if main_phase else None),
                    row(f"e2e CPU ms per identification, all processes ({tag})",
                        ph["cpu_ms_per_identification_total"], None, None, "report"),
                ]
            for name, mb in r["peak_rss_mb"].items():
                rows.append(row(f"peak RSS {name} (after e2e)", round(mb) if mb else None, None, None,
                                "< 500 MB", bool(mb and mb < 500)))
        if "rebuild" in parts:
            n = cfg["rebuild_n"]
            log(f"rebuild: analytics from {n:,} events (preload, rebuild tool, service recovery)")
            r = await analytics.run_rebuild(stack, n=n, log=log)
            raw["rebuild"] = r
            per_1m = r["total_s"] * 1_000_000 / r["events"]
            label = "analytics rebuild 1M events s" + ("" if r["events"] >= 1_000_000 else
                                                        f" (extrapolated from {r['events']:,})")
            rows += [
                row(label, round(per_1m), None, None, "< 300 s", per_1m < 300),
                row("peak RSS analytics rebuild tool", round(r["rebuild_peak_rss_mb"]), None, None, "< 500 MB",
                    r["rebuild_peak_rss_mb"] < 500),
                row(f"peak RSS analytics service after recovering {r['events']:,}", round(r["service_peak_rss_mb"]),
                    None, None, "< 500 MB", r["service_peak_rss_mb"] < 500),
            ]
    finally:
        stack.close()
    return rows, raw


def render(rows: list[dict], title: str) -> Table:
    t = Table(title=title)
    for col in ("figure", "ours", "baseline", "ratio", "target", "pass/fail"):
        t.add_column(col, justify="left" if col in ("figure", "target") else "right")
    for r in rows:
        verdict = "" if r["pass"] is None else ("[green]pass[/]" if r["pass"] else "[red]FAIL[/]")
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
    console.print(render(rows, f"CLMS benchmarks ({'quick' if args.quick else 'full'}, {elapsed / 60:.1f} min, "
                               f"commit {info['commit']})"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": datetime.now(timezone.utc).isoformat(), "quick": args.quick,
                               "parts": parts, "config": cfg, "machine": info, "elapsed_s": elapsed,
                               "rows": rows, "raw": raw}, indent=2, default=str))
    console.print(f"results written to {out}")
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
