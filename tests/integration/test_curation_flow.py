"""Simulated users over the real API -> lake -> curation -> filter report; a rerun is byte-identical."""

from __future__ import annotations

import json

import pytest

from flywheel.app.simulate import SimConfig, filter_report, run_simulation
from flywheel.storage import open_storage
from pipelines.curation import curate

pytestmark = pytest.mark.integration


def test_simulated_adversaries_are_caught_and_curation_is_reproducible(settings, tmp_path):
    sim = run_simulation(settings, SimConfig(users=80, conversations_per_user=5, adversary_share=0.15, prompts=60, seed=5),
                         truth_path=tmp_path / "truth.json")
    settings.curation.blocklist_file = sim["blocklist"]
    first = curate(settings, sim["start"], sim["end"])
    storage = open_storage(settings.lake.uri, settings.lake)
    files = ["pairs.parquet", "unpaired.parquet", "prompts.parquet", "quarantine.parquet", "manifest.json"]
    before = {f: storage.get_bytes(f"datasets/{first.version}/{f}") for f in files}
    second = curate(settings, sim["start"], sim["end"])
    assert second.version == first.version
    assert {f: storage.get_bytes(f"datasets/{first.version}/{f}") for f in files} == before, "not byte-identical"

    import io

    import pandas as pd

    quarantine = pd.read_parquet(io.BytesIO(before["quarantine.parquet"]))
    report = filter_report(quarantine, json.loads((tmp_path / "truth.json").read_text()))
    assert report["precision"] >= 0.95, report
    assert report["recall"] >= 0.90, report
    assert report["honest_held_back_share"] < 0.02, report
    manifest = json.loads(before["manifest.json"])
    assert manifest["pairs_by_source"] and manifest["agreement"]["items"] > 0
    # the consumer held the blocked accounts' feedback (and the harmful corrections it could judge alone)
    truth = json.loads((tmp_path / "truth.json").read_text())
    blocked = {u for u, role in truth["users"].items() if role == "blocked"}
    held = manifest["held_at_ingest"]
    assert held > 0 and storage.list("quarantine/reason=blocked_account/")
    assert set(quarantine.loc[quarantine["reason"] == "blocked_account", "user_id"]) == blocked & set(quarantine["user_id"])
    assert storage.exists(f"datasets/{first.version}/card.md")
