"""The dataset module is the one owner of the format: what it writes, it (and only it) reads back, by URI or by
the bare version id; the version is a function of the tables' bytes; a table that breaks its schema is never
written."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pandera.errors
import pytest

from flywheel.settings import Settings
from flywheel.storage import LocalStorage
from pipelines.dataset import VERSION_PATTERN, open_dataset, write_dataset

START, END = datetime(2026, 12, 1, 10, tzinfo=UTC), datetime(2026, 12, 1, 11, tzinfo=UTC)


@pytest.fixture(scope="module")
def dataset():
    from flywheel.app.simulate import simulated_dataset

    return simulated_dataset(users=30, prompts=20)


def test_what_is_written_opens_by_uri_and_by_version_id(tmp_path, dataset):
    settings = Settings(home=tmp_path)
    storage = LocalStorage(tmp_path / "lake")
    settings.lake.uri = storage.uri
    pub = write_dataset(storage, dataset, {"note": "test"}, interval=(START, END))
    assert VERSION_PATTERN.fullmatch(pub.version)
    again = write_dataset(LocalStorage(tmp_path / "other"), dataset, {"note": "test"}, interval=(START, END))
    assert again.version == pub.version  # the same tables, the same version
    for ref in (pub.uri, pub.version):
        ds = open_dataset(ref, settings)
        assert ds.version == pub.version and ds.manifest["note"] == "test"
        pd.testing.assert_frame_equal(ds.table("pairs"), dataset.pairs.reset_index(drop=True), check_dtype=False)
    assert ds.manifest["files"]["pairs.parquet"]["rows"] == len(dataset.pairs)
    with pytest.raises(ValueError, match="no table"):
        ds.table("secrets")
    assert (tmp_path / "lake" / "datasets" / "by-interval" / "20261201T100000Z--20261201T110000Z.json").exists()


def test_a_table_that_breaks_its_schema_is_never_written(tmp_path, dataset):
    from dataclasses import replace

    bad = replace(dataset, pairs=dataset.pairs.assign(margin=2.0))
    storage = LocalStorage(tmp_path / "lake")
    with pytest.raises(pandera.errors.SchemaErrors):
        write_dataset(storage, bad, {}, interval=(START, END))
    assert storage.list() == []
