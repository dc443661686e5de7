"""Curated datasets as the trainers read them: by URI (``file://…/datasets/<version>``, ``s3://…``) or by
version id under the configured lake."""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from typing import Any

import pandas as pd

from flywheel.settings import Settings
from flywheel.storage import open_storage


@dataclass
class CuratedDataset:
    uri: str
    version: str
    manifest: dict[str, Any]
    _storage: Any

    def table(self, name: str) -> pd.DataFrame:
        """``pairs``, ``unpaired``, ``prompts`` or ``quarantine``."""
        return pd.read_parquet(io.BytesIO(self._storage.get_bytes(f"{name}.parquet")))


def open_dataset(ref: str, settings: Settings) -> CuratedDataset:
    if re.fullmatch(r"[0-9a-f]{16}", ref):  # a bare version id: under the lake's datasets/
        ref = f"{settings.lake.uri.rstrip('/')}/datasets/{ref}"
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


def split_prompts(ds: Any, split: str, n: int, seed: int) -> list[Any]:
    """``n`` prompts of a dataset's ``split`` (``train``/``eval``), in a seeded random order: strings, or message
    lists for conversations (datasets that have a ``messages`` column)."""
    df = ds.table("prompts")
    df = df[df["split"] == split].sort_values("prompt_id")
    texts = [conversation(m) for m in df["messages"]] if "messages" in df else df["prompt"].tolist()
    random.Random(seed).shuffle(texts)
    return texts[:n]
