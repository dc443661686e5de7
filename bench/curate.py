"""Curation throughput: synthetic events -> published dataset (filters, pairs, agreement, splits, PII, pandera).

    .venv/bin/python bench/curate.py [--events 1000000]

The events come from the simulator (honest users and 10% adversaries over 2,000 ShareGPT prompts) and are
loaded as the lake tables curation reads; the timed part is ``build_dataset`` + ``publish_dataset`` into a
local directory. Target: 1,000,000 events in <= 30 s on the 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


from flywheel.app.simulate import SimConfig, lake_tables, simulate_events  # noqa: E402
from flywheel.storage import LocalStorage  # noqa: E402
from ingest.filters import FilterConfig  # noqa: E402
from pipelines.curation import build_dataset, publish_dataset, unify_feedback  # noqa: E402
from pipelines.sharegpt import chat_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    samples, now = chat_samples(2_000), datetime.now(UTC)
    # events per simulated user depend on the mix of roles; calibrate on a small run with the same seed
    calib = simulate_events(samples, SimConfig(users=1_000, prompts=2_000, seed=1), now=now)
    users = round(args.events * 1_000 / len(calib.events))
    sim = simulate_events(samples, SimConfig(users=users, prompts=2_000, seed=1), now=now)
    turns, frames = lake_tables(sim.events)
    n = len(sim.events)
    print(f"generated {n:,} events ({len(turns):,} turns) in {time.perf_counter() - t0:.1f}s (not timed)")
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        feedback = unify_feedback(frames)
        ds = build_dataset(turns, feedback, FilterConfig(blocked_users=frozenset(sim.blocked_users)))
        t2 = time.perf_counter()
        result = publish_dataset(LocalStorage(tmp), ds, start=datetime(2026, 1, 1, tzinfo=UTC),
                                 end=datetime(2026, 1, 2, tzinfo=UTC), partitions=[], lake_uri="memory")
        t3 = time.perf_counter()
    total = t3 - t1
    print(f"build {t2 - t1:.1f}s + publish {t3 - t2:.1f}s = {total:.1f}s  ->  {n / total:,.0f} events/s "
          f"(target: 1,000,000 events in <= 30 s)")
    print(f"dataset {result.version}: {len(ds.pairs):,} pairs, {len(ds.unpaired):,} unpaired, "
          f"{len(ds.prompts):,} prompts, {len(ds.quarantine):,} held back")


if __name__ == "__main__":
    main()
