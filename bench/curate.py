"""Curation throughput: synthetic events -> published dataset (filters, pairs, agreement, splits, PII, pandera).

    .venv/bin/python bench/curate.py [--events 1000000]

The events come from the simulator (honest users and 10% adversaries over 2,000 ShareGPT prompts) and are
loaded as the lake tables curation reads; the timed part is ``build_dataset`` + ``publish_dataset`` into a
local directory. Target: 1,000,000 events in <= 30 s on the 2-core machine; peak memory is printed (10,000,000
events must complete on it).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


from flywheel.app.simulate import SimConfig, lake_tables, simulate_events  # noqa: E402
from flywheel.storage import LocalStorage  # noqa: E402
from ingest.filters import FilterConfig  # noqa: E402
from pipelines.curation import build_dataset, publish_dataset, unify_feedback  # noqa: E402
from pipelines.sharegpt import chat_samples  # noqa: E402

CHUNK_USERS = 20_000


def generate(n_events: int, seed: int = 1) -> tuple[Any, dict[str, Any], set[str]]:
    """Simulated lake tables of about ``n_events`` events: users simulated in chunks of 20,000 (each chunk its own
    seed, so its own user ids) and each chunk turned into columns at once, so the generator never holds more
    than one chunk's events as Python objects (10M events as dicts would not fit in this machine's memory)."""
    import pandas as pd

    samples, now = chat_samples(2_000), datetime.now(UTC)
    # events per simulated user depend on the mix of roles; calibrate on a small run with the same seed
    per_user = len(simulate_events(samples, SimConfig(users=1_000, prompts=2_000, seed=seed), now=now).events) / 1_000
    users = round(n_events / per_user)
    turns, frames, blocked = [], dict[str, list[Any]](), set[str]()
    for i, first in enumerate(range(0, users, CHUNK_USERS)):
        sim = simulate_events(samples, SimConfig(users=min(CHUNK_USERS, users - first), prompts=2_000, seed=seed + i),
                              now=now)
        blocked.update(sim.blocked_users)
        t, f = lake_tables(sim.events)
        del sim
        turns.append(t)
        for k, v in f.items():
            frames.setdefault(k, []).append(v)
    return (pd.concat(turns, ignore_index=True), {k: pd.concat(v, ignore_index=True) for k, v in frames.items()},
            blocked)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    turns, frames, blocked = generate(args.events)
    n = len(turns) + sum(len(f) for f in frames.values())
    print(f"generated {n:,} events ({len(turns):,} turns) in {time.perf_counter() - t0:.1f}s (not timed); "
          f"peak memory so far {peak_rss_gb():.1f} GB")
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        feedback = unify_feedback(frames)
        ds = build_dataset(turns, feedback, FilterConfig(blocked_users=frozenset(blocked)))
        t2 = time.perf_counter()
        result = publish_dataset(LocalStorage(tmp), ds, start=datetime(2026, 1, 1, tzinfo=UTC),
                                 end=datetime(2026, 1, 2, tzinfo=UTC), partitions=[], lake_uri="memory")
        t3 = time.perf_counter()
    total = t3 - t1
    print(f"build {t2 - t1:.1f}s + publish {t3 - t2:.1f}s = {total:.1f}s  ->  {n / total:,.0f} events/s "
          f"(target: 1,000,000 events in <= 30 s)")
    print(f"dataset {result.version}: {len(ds.pairs):,} pairs, {len(ds.unpaired):,} unpaired, "
          f"{len(ds.prompts):,} prompts, {len(ds.quarantine):,} held back")
    print(f"peak memory (resident, the whole process): {peak_rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
