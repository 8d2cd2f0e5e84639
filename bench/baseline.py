"""The bare faust baseline (`../shared/baselines/faust_baseline.py`), run once per part that
compares against it (referral, analytics; notifications reuses the referral part's figure)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_DIR = Path(os.environ.get("BASELINE_DIR", ROOT.parent / "shared" / "baselines"))


async def _declare_topics(bootstrap: str, run: str) -> None:
    """Declare the baseline's source and output topics before it starts. On a broker that does
    not create topics on first use (Apache Kafka as configured here, as in production) faust
    otherwise sends to an output topic that never appears, and its consumer, subscribing while the
    preload task is still declaring the source, ignores the missing topic for good: either way
    the baseline waits forever."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"fb-{kind}-{run}", num_partitions=6, replication_factor=1)
                                   for kind in ("src", "out")])
    finally:
        await admin.close()


def faust_rate(bootstrap: str, n: int, *, timeout_s: float = 600) -> float:
    """events/s of one faust worker over n preloaded events (blocking: call it in a thread)."""
    run = uuid.uuid4().hex[:6]
    asyncio.run(_declare_topics(bootstrap, run))
    env = {**os.environ, "BOOTSTRAP": bootstrap, "N": str(n), "FETCH_WAIT_MS": "20", "RUN": run,
           "PYTHONPATH": str(BASELINE_DIR)}
    faust = shutil.which("faust", path=str(Path(sys.executable).parent)) or "faust"
    # run in a folder of its own: faust writes its data folder into the working directory, which
    # must not be the shared baselines folder
    with tempfile.TemporaryDirectory(prefix="clms-bench-faust-") as cwd:
        out = subprocess.run([faust, "-A", "faust_baseline", "worker", "-l", "warn"], cwd=cwd,
                             env=env, capture_output=True, text=True, timeout=timeout_s)
    m = re.search(r"faust_events_per_s=(\d+)", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"the faust baseline printed no figure:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(m.group(1))
