"""The curated dataset format, written and read here only: its tables, their schemas, the version id, the layout.

    <lake>/datasets/<version>/{pairs,unpaired,prompts,quarantine}.parquet   (validated by pipelines.schemas)
                             manifest.json  card.md  plots/*.png
    <lake>/datasets/by-interval/<start>--<end>.json                          {"version": ...}

The version id is a BLAKE2b digest (``VERSION_BYTES`` bytes, hex) of the four tables' Parquet bytes, so the same
interval over the same lake gives the same version, byte for byte; :data:`VERSION_PATTERN` is derived from the
same constant, so a reader recognises exactly the ids the writer makes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.settings import Settings
from flywheel.storage import Storage, open_storage
from pipelines import schemas

DATASETS_ROOT = "datasets"
TABLES = ("pairs", "unpaired", "prompts", "quarantine")
SCHEMAS = {"pairs": schemas.PAIRS, "unpaired": schemas.UNPAIRED, "prompts": schemas.PROMPTS,
           "quarantine": schemas.QUARANTINE}
VERSION_BYTES = 8
VERSION_PATTERN = re.compile(rf"[0-9a-f]{{{2 * VERSION_BYTES}}}")


@dataclass
class Dataset:
    """A dataset's tables before they are published, and curation's statistics for its manifest."""

    pairs: pd.DataFrame
    unpaired: pd.DataFrame
    prompts: pd.DataFrame
    quarantine: pd.DataFrame
    stats: dict[str, Any] = field(default_factory=dict)
    review_items: pd.DataFrame | None = None  # what curation routed to review (written to the queue, not published)

    def validate(self) -> None:
        """Every table against its schema (pandera, all failures at once)."""
        for name in TABLES:
            SCHEMAS[name].validate(getattr(self, name), lazy=True)


def parquet_bytes(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf, compression="zstd")
    return buf.getvalue()


def dataset_version(blobs: Mapping[str, bytes]) -> str:
    h = hashlib.blake2b(digest_size=VERSION_BYTES)
    for name in sorted(blobs):
        h.update(name.encode() + b"\0" + blobs[name])
    return h.hexdigest()


def interval_key(start: Any, end: Any) -> str:
    return f"{start:%Y%m%dT%H%M%SZ}--{end:%Y%m%dT%H%M%SZ}"


@dataclass(frozen=True)
class PublishedDataset:
    version: str
    uri: str
    manifest: dict[str, Any]


def write_dataset(storage: Storage, ds: Dataset, manifest: dict[str, Any], *, interval: tuple[Any, Any],
                  card: Any = None) -> PublishedDataset:
    """Validate and write ``ds`` under its version: the tables, then the card (``card(ds, manifest) -> (markdown,
    {name: png})``), then ``manifest.json`` last (a reader opens a dataset by its manifest, so it never sees half
    of one), then the interval's pointer."""
    ds.validate()
    blobs = {name: parquet_bytes(getattr(ds, name)) for name in TABLES}
    version = dataset_version(blobs)
    prefix = f"{DATASETS_ROOT}/{version}"
    for name, data in blobs.items():
        storage.put_bytes(f"{prefix}/{name}.parquet", data)
    manifest = {"version": version, **manifest,
                "files": {f"{name}.parquet": {"rows": int(len(getattr(ds, name))), "bytes": len(b)}
                          for name, b in blobs.items()}, **ds.stats}
    if card is not None:
        text, plots = card(ds, manifest)
        for name, png in plots.items():
            storage.put_bytes(f"{prefix}/plots/{name}", png)
        storage.put_bytes(f"{prefix}/card.md", text.encode())
    storage.put_bytes(f"{prefix}/manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    storage.put_bytes(f"{DATASETS_ROOT}/by-interval/{interval_key(*interval)}.json",
                      json.dumps({"version": version}).encode())
    return PublishedDataset(version, f"{storage.uri.rstrip('/')}/{prefix}", manifest)


@dataclass
class CuratedDataset:
    """A published dataset, opened by its manifest; tables are read on demand."""

    uri: str
    version: str
    manifest: dict[str, Any]
    storage: Storage

    def table(self, name: str) -> pd.DataFrame:
        """``pairs``, ``unpaired``, ``prompts`` or ``quarantine``."""
        if name not in TABLES:
            raise ValueError(f"no table {name!r} in a curated dataset: one of {TABLES}")
        return pd.read_parquet(io.BytesIO(self.storage.get_bytes(f"{name}.parquet")))


def open_dataset(ref: str, settings: Settings) -> CuratedDataset:
    """A dataset by URI (``file://…/datasets/<version>``, ``s3://…``) or by version id under the lake."""
    if VERSION_PATTERN.fullmatch(ref):  # a bare version id: under the lake's datasets/
        ref = f"{settings.lake.uri.rstrip('/')}/{DATASETS_ROOT}/{ref}"
    storage = open_storage(ref, settings.lake)
    try:
        manifest = json.loads(storage.get_bytes("manifest.json"))
    except (FileNotFoundError, KeyError) as e:
        raise FileNotFoundError(f"no curated dataset at {ref} (manifest.json missing); run `flywheel curate`") from e
    except Exception as e:  # botocore's NoSuchKey and friends
        if "NoSuchKey" in type(e).__name__ or "404" in str(e):
            raise FileNotFoundError(f"no curated dataset at {ref} (manifest.json missing)") from e
        raise
    return CuratedDataset(ref, manifest["version"], manifest, storage)


def conversation(messages_json: str) -> Any:
    """A prompt from a dataset's ``messages`` column: the user's text for a single user message, else the list of
    messages (training.generation renders either with the chat template, as serving renders the same messages)."""
    msgs = json.loads(messages_json)
    return msgs[0]["content"] if len(msgs) == 1 and msgs[0].get("role") == "user" else msgs


def split_prompts(ds: CuratedDataset, split: str, n: int, seed: int) -> list[Any]:
    """``n`` prompts of a dataset's ``split`` (``train``/``eval``), in a seeded random order: strings, or message
    lists for conversations (datasets that have a ``messages`` column)."""
    df = ds.table("prompts")
    df = df[df["split"] == split].sort_values("prompt_id")
    texts = [conversation(m) for m in df["messages"]] if "messages" in df else df["prompt"].tolist()
    random.Random(seed).shuffle(texts)
    return texts[:n]
