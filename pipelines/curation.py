"""Curation: one interval of the event lake -> filtered feedback -> versioned preference datasets.

    lake (turns + feedback of [start, end)) -> filters (held back -> quarantine, with reasons)
      -> pairs (correction / pairwise / regenerate / thumbs, raters aggregated, agreement measured)
      -> unpaired labels (KTO) and a deduplicated prompt set (PPO)
      -> near-duplicate prompt groups -> train/eval split by group -> PII masked -> pandera-validated
      -> datasets/<version>/{pairs,unpaired,prompts,quarantine}.parquet + manifest.json + card.md + plots/

:func:`build_dataset` is pure (tables in, tables out); :func:`curate` does the I/O. The version id is a hash
of the four tables' bytes, so the same interval over the same lake gives the same version, byte for byte.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.events import flatten_messages
from flywheel.settings import ReviewSettings, Settings
from flywheel.storage import Storage, open_storage
from ingest.filters import FEEDBACK_COLUMNS, REASONS, FilterConfig, apply_filters
from ingest.lake import held_reasons, list_files, read_events
from ingest.text import mask_pii, near_duplicate_groups, normalize, stable_hash
from pipelines.agreement import agreement
from pipelines.dataset import Dataset, PublishedDataset, write_dataset
from pipelines.preferences import PairingConfig, aggregate_votes, build_votes, thumbs_pairs, unpaired_labels
from pipelines.review import (
    POSITIVE,
    latest_decisions,
    outcomes,
    read_queue,
    review_stats,
    route_items,
    write_queue,
)

log = logging.getLogger(__name__)
PAIR_COLUMNS = ["pair_id", "prompt", "chosen", "rejected", "source", "margin", "group_id", "split", "event_ids",
                "reviewed"]


# --------------------------------------------------------------------------------------------- tables
def prepare_turns(turns: pd.DataFrame) -> pd.DataFrame:
    """Lake turns -> ``event_id, response_id, user_id, occurred_at, prompt, response, prompt_key, response_key``."""
    if turns.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in (
            "event_id", "response_id", "user_id", "occurred_at", "prompt", "response", "prompt_key", "response_key",
            "model_version", "messages", "conversation_id")}).astype({"occurred_at": "datetime64[us, UTC]"})
    out = turns.reindex(columns=["event_id", "response_id", "user_id", "occurred_at", "response", "model_version",
                                 "conversation_id"]).copy()
    out["prompt"] = [flatten_messages(m) for m in turns["messages"]]
    out["messages"] = [json.dumps([{"role": str(x["role"]), "content": str(x["content"])} for x in m], ensure_ascii=False)
                       for m in turns["messages"]]
    keys: dict[str, str] = {}
    for text in pd.unique(pd.concat([out["prompt"], out["response"]], ignore_index=True)):
        keys[text] = stable_hash(normalize(text))
    out["prompt_key"] = out["prompt"].map(keys)
    out["response_key"] = out["response"].map(keys)
    # one row per response_id (a retried log of the same turn keeps its first copy)
    return out.drop_duplicates("response_id").reset_index(drop=True)


def unify_feedback(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The per-type feedback tables as one table with ``FEEDBACK_COLUMNS``."""
    spec = {
        "thumbs": {"response_id": "response_id", "value": "value"},
        "correction": {"response_id": "response_id", "corrected_text": "corrected_text"},
        "regenerate": {"response_id": "discarded_response_id", "other_response_id": "new_response_id"},
        "pairwise": {"response_id": "response_a_id", "other_response_id": "response_b_id", "value": "choice"},
        "implicit": {"response_id": "response_id", "value": "action"},
    }
    parts = []
    for event_type, mapping in spec.items():
        df = frames.get(event_type)
        if df is None or df.empty:
            continue
        part = pd.DataFrame({"event_id": df["event_id"], "type": event_type, "user_id": df["user_id"],
                             "occurred_at": df["occurred_at"]})
        for col in ["response_id", "other_response_id", "value", "corrected_text"]:
            part[col] = df[mapping[col]] if col in mapping else None
        parts.append(part)
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in FEEDBACK_COLUMNS}).astype(
            {"occurred_at": "datetime64[us, UTC]"})
    fb = pd.concat(parts, ignore_index=True)
    return fb.sort_values(["occurred_at", "event_id"], kind="stable").reset_index(drop=True)[FEEDBACK_COLUMNS]


# ---------------------------------------------------------------------------------------------- build
def _group_prompts(turns: pd.DataFrame, eval_share: float) -> pd.DataFrame:
    """Unique prompts, their near-duplicate group and split (by group, so no group straddles the split)."""
    prompts = (turns.groupby("prompt_key", sort=True)
               .agg(prompt=("prompt", "first"), messages=("messages", "first"), n_turns=("event_id", "size"))
               .reset_index())
    reps = near_duplicate_groups(prompts["prompt"].tolist())
    prompts["group_id"] = prompts["prompt_key"].to_numpy()[reps]
    bucket = prompts["group_id"].map(lambda g: int(g[:8], 16) % 10_000)
    prompts["split"] = np.where(bucket < eval_share * 10_000, "eval", "train")
    return prompts


def _mask(df: pd.DataFrame, cols: list[str], counts: dict[str, int]) -> pd.DataFrame:
    df = df.copy()
    cache: dict[str, str] = {}
    for col in cols:
        out = []
        for text in df[col].tolist():  # a list, not the Series: pandas' Arrow strings iterate slowly
            masked = cache.get(text)
            if masked is None:
                masked, found = mask_pii(text)
                cache[text] = masked
                for k, v in found.items():
                    counts[k] += v
            out.append(masked)
        df[col] = out
    return df


QUARANTINE_COLUMNS = ["event_id", "reason", "type", "user_id", "occurred_at"]


@dataclass(frozen=True)
class ReviewInput:
    """What curation needs for review: the settings (routing and what unreviewed corrections do), the interval,
    the reviewers' latest decisions (:func:`pipelines.review.latest_decisions`), the items already queued about
    this interval's feedback (by any run: the hourly curation's, the loop's ``uncertain`` pairs), the
    held-at-ingest feedback rows (a sample is routed) and whether this run routes items itself (the interval's
    own curation does; a training window's curation only applies the decisions on what is queued)."""

    cfg: ReviewSettings
    start: datetime
    end: datetime
    decisions: pd.DataFrame
    other_items: pd.DataFrame | None = None
    held_feedback: pd.DataFrame | None = None
    route: bool = True


def _apply_review(kept: pd.DataFrame, items: pd.DataFrame, review: ReviewInput) -> tuple[pd.DataFrame, pd.DataFrame, set[str]]:
    """(the kept feedback without what reviewers rejected, the rejected and held rows for quarantine, the ids of
    the feedback reviewers accepted). A fixed correction carries the reviewer's text from here on; with
    ``unreviewed_corrections: hold`` a routed correction no reviewer accepted yet waits (``awaiting_review``)."""
    result = outcomes(review.decisions[review.decisions["item_id"].isin(items["item_id"])])
    target = dict(zip(items["item_id"], items["target_event_id"], strict=True))
    rejected = {target[i]: f"reviewer_rejected:{o.reason}" for i, o in result.items() if o.decision == "reject"}
    fixed = {target[i]: o.edited_text for i, o in result.items() if o.decision == "fix"}
    accepted = {target[i] for i, o in result.items() if o.decision in POSITIVE}
    if review.cfg.unreviewed_corrections == "hold":
        routed = items.loc[items["route"] == "correction", "target_event_id"]
        rejected |= {t: "awaiting_review" for t in routed if t not in accepted and t not in rejected}
    out = kept["event_id"].astype(str).map(rejected)
    held = kept[out.notna()].assign(reason=out[out.notna()])[QUARANTINE_COLUMNS]
    kept = kept[out.isna()].copy()
    if fixed:
        new_text = kept["event_id"].astype(str).map(fixed)
        kept["corrected_text"] = new_text.where(new_text.notna(), kept["corrected_text"])
    return kept, held, accepted


def build_dataset(turns_raw: pd.DataFrame, feedback: pd.DataFrame, cfg: FilterConfig, *, eval_share: float = 0.1,
                  held: pd.DataFrame | None = None, review: ReviewInput | None = None) -> Dataset:
    """Pure: lake tables of one interval -> the four published tables and their statistics.

    ``held`` are the events the consumer already held back (``QUARANTINE_COLUMNS``); they join the
    quarantine table, and the same ids are ignored if they also reached the event tables. ``review``: the
    reviewers' decisions (rejected feedback goes to quarantine as ``reviewer_rejected:<reason>``; pairs from
    accepted feedback are marked ``reviewed``) and the review section of the statistics."""
    turns = prepare_turns(turns_raw)
    held = held if held is not None and not held.empty else None
    filtered = apply_filters(feedback if held is None else feedback[~feedback["event_id"].isin(held["event_id"])],
                             turns, cfg)
    if held is not None:
        filtered.quarantine = pd.concat([filtered.quarantine, held[QUARANTINE_COLUMNS]], ignore_index=True) \
            .drop_duplicates("event_id").sort_values(["occurred_at", "event_id"], kind="stable").reset_index(drop=True)
        counts = filtered.quarantine["reason"].value_counts()
        filtered.held_by_reason = {r: int(counts.get(r, 0)) for r in REASONS}
    kept, routed, accepted = filtered.kept, None, set[str]()
    if review is not None:
        shown = feedback if review.held_feedback is None else \
            pd.concat([feedback, review.held_feedback], ignore_index=True).drop_duplicates("event_id")
        routed = route_items(turns, shown, filtered.quarantine, review.cfg, start=review.start, end=review.end)
        if not review.route:
            routed = routed.iloc[0:0]
        every = routed if review.other_items is None else \
            pd.concat([routed, review.other_items], ignore_index=True).drop_duplicates("item_id")
        kept, by_review, accepted = _apply_review(kept, every, review)
        if len(by_review):
            filtered.quarantine = pd.concat([filtered.quarantine, by_review], ignore_index=True) \
                .sort_values(["occurred_at", "event_id"], kind="stable").reset_index(drop=True)
    votes = build_votes(kept, turns)
    rater_pairs, items, ties = aggregate_votes(votes)
    thumb = thumbs_pairs(kept, turns, PairingConfig())
    pairs = pd.concat([p for p in (rater_pairs, thumb) if not p.empty], ignore_index=True) \
        if not (rater_pairs.empty and thumb.empty) else rater_pairs
    prompts = _group_prompts(turns, eval_share)
    group_of = dict(zip(prompts["prompt_key"], prompts["group_id"], strict=True))
    split_of = dict(zip(prompts["prompt_key"], prompts["split"], strict=True))
    pii = {"email": 0, "card": 0, "phone": 0}

    if pairs.empty:
        pairs = pd.DataFrame({c: pd.Series(dtype=float if c == "margin" else object if c == "event_ids" else "str")
                              for c in PAIR_COLUMNS[:-1]})
    else:
        pairs["group_id"] = pairs["prompt_key"].map(group_of)
        pairs["split"] = pairs["prompt_key"].map(split_of)
        pairs["pair_id"] = [stable_hash(s + "|" + ",".join(ids)) for s, ids in zip(pairs["source"], pairs["event_ids"], strict=True)]
        pairs = _mask(pairs, ["prompt", "chosen", "rejected"], pii)
        pairs = pairs[pairs["chosen"] != pairs["rejected"]]
        pairs = pairs.sort_values("pair_id", kind="stable")[PAIR_COLUMNS[:-1]].reset_index(drop=True)
        pairs["margin"] = pairs["margin"].astype(float)
    pairs["reviewed"] = pd.Series([bool(accepted.intersection(ids)) for ids in pairs["event_ids"]], index=pairs.index,
                                  dtype=bool)

    unpaired = unpaired_labels(kept, turns)
    unpaired["group_id"] = unpaired["prompt_key"].map(group_of)
    unpaired["split"] = unpaired["prompt_key"].map(split_of)
    unpaired = _mask(unpaired, ["prompt", "completion"], pii)
    unpaired = unpaired.assign(_k=[",".join(ids) + str(lbl) for ids, lbl in zip(unpaired["event_ids"], unpaired["label"], strict=True)])
    unpaired = unpaired.sort_values("_k", kind="stable")[
        ["prompt", "completion", "label", "source", "group_id", "split", "event_ids"]].reset_index(drop=True)
    unpaired["label"] = unpaired["label"].astype(bool)
    if unpaired.empty:  # no feedback left: the columns still need their types for the schema and Parquet
        unpaired = unpaired.astype({c: "str" for c in ("prompt", "completion", "source", "group_id", "split")})

    # the messages carry the prompt's text again: masked the same way, not counted twice
    prompt_set = _mask(_mask(prompts, ["prompt"], pii), ["messages"], {"email": 0, "card": 0, "phone": 0}).rename(columns={"prompt_key": "prompt_id"})[
        ["prompt_id", "prompt", "messages", "group_id", "split", "n_turns"]].astype({"n_turns": int})
    if prompt_set.empty:  # an interval without turns: keep the string columns typed
        prompt_set = prompt_set.astype({c: "str" for c in ("prompt_id", "prompt", "messages", "group_id", "split")})

    quarantine = filtered.quarantine.astype({"event_id": str, "reason": str, "type": str, "user_id": str})
    overall = agreement(items)
    stats = {
        "events_read": {"turn": int(len(turns_raw)), **{t: int(n) for t, n in feedback["type"].value_counts().sort_index().items()}},
        "feedback_read": int(len(feedback)),
        "held_at_ingest": int(0 if held is None else len(held)),
        "held_back": int(len(quarantine)),
        "held_back_by_reason": filtered.held_by_reason,
        "pairs_by_source": {s: int(n) for s, n in pairs["source"].value_counts().sort_index().items()},
        "pairs_by_split": {s: int(n) for s, n in pairs["split"].value_counts().sort_index().items()},
        "ties_dropped": ties,
        "agreement": overall.as_dict(),
        "unpaired_by_label": {str(k).lower(): int(v) for k, v in unpaired["label"].value_counts().sort_index().items()},
        "prompts": int(len(prompt_set)),
        "prompt_groups": int(prompt_set["group_id"].nunique()),
        "pii_masked": pii,
    }
    if review is not None and routed is not None:
        stats["review"] = review_stats(every, review.decisions) | {
            "held_by_review": {str(k): int(v) for k, v in by_review["reason"].value_counts().sort_index().items()},
            "reviewed_pairs": int(pairs["reviewed"].sum())}
    ds = Dataset(pairs, unpaired, prompt_set, quarantine, stats, review_items=routed)
    ds.validate()
    return ds


# ---------------------------------------------------------------------------------------------- write
def code_version() -> str:
    from importlib.metadata import version

    v = version("rlhf-flywheel")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
    except OSError:
        sha = ""
    return f"{v}+{sha}" if sha else v


def publish_dataset(storage: Storage, ds: Dataset, *, start: datetime, end: datetime, partitions: list[str],
                    lake_uri: str) -> PublishedDataset:
    from pipelines.card import render_card

    manifest = {
        "interval": {"start": start.isoformat(), "end": end.isoformat()},
        "lake": lake_uri,
        "lake_partitions_read": sorted({p.rsplit("/", 1)[0] for p in partitions}),
        "lake_files_read": len(partitions),
        "code_version": code_version(),
    }
    return write_dataset(storage, ds, manifest, interval=(start, end), card=render_card)


# ------------------------------------------------------------------------------------------------ run
FEEDBACK_TYPES = ("thumbs", "regenerate", "correction", "pairwise", "implicit")


@dataclass(frozen=True)
class Interval:
    """What curation reads of the lake for ``[start, end)``: turns (from ``start - lookback``: feedback refers
    to earlier turns), the feedback by type, the feedback the consumer held back (``held``:
    ``QUARANTINE_COLUMNS``; ``held_frames``: its rows by type), the review decisions and the files read."""

    turns: pd.DataFrame
    frames: dict[str, pd.DataFrame]
    held: pd.DataFrame
    held_frames: dict[str, pd.DataFrame]
    reviews: pd.DataFrame
    files: list[str]


def read_interval(storage: Storage, start: datetime, end: datetime, lookback: timedelta,
                  review_lookahead: timedelta = timedelta(0)) -> Interval:
    """The lake's tables of one interval; reviews from ``start`` to ``end + review_lookahead`` (a decision on an
    interval's feedback is made after it)."""
    turns = read_events(storage, "turn", start - lookback, end)
    frames = {t: read_events(storage, t, start, end) for t in FEEDBACK_TYPES}
    files = list_files(storage, "turn", start - lookback, end)
    for t in frames:
        files += list_files(storage, t, start, end)
    held_parts, held_frames = [], dict[str, pd.DataFrame]()
    for reason in held_reasons(storage):
        for t in FEEDBACK_TYPES:
            df = read_events(storage, t, start, end, held=reason)
            if not df.empty:
                held_parts.append(df[["event_id", "type", "user_id", "occurred_at"]].assign(reason=reason))
                held_frames[t] = pd.concat([held_frames[t], df], ignore_index=True) if t in held_frames else df
            files += list_files(storage, t, start, end, held=reason)
    held = pd.concat(held_parts, ignore_index=True)[QUARANTINE_COLUMNS] if held_parts else \
        pd.DataFrame({c: pd.Series(dtype="str") for c in QUARANTINE_COLUMNS}).astype({"occurred_at": "datetime64[us, UTC]"})
    reviews = read_events(storage, "review", start, end + review_lookahead) if review_lookahead else \
        pd.DataFrame(columns=["event_id"])
    if review_lookahead:
        files += list_files(storage, "review", start, end + review_lookahead)
    return Interval(turns, frames, held, held_frames, reviews, sorted(files))


def curate(settings: Settings, start: datetime, end: datetime, *, route_review: bool = True) -> PublishedDataset:
    """Curate ``[start, end)``: apply the reviewers' decisions made so far on every queued item about the
    interval's feedback, publish the dataset, and (``route_review``: the interval's own curation, not a training
    window's) write the items this run routes to review (the ``filters`` part of the interval's queue)."""
    storage = open_storage(settings.lake.uri, settings.lake)
    c, rv = settings.curation, settings.review
    lake = read_interval(storage, start, end, timedelta(hours=c.turn_lookback_h), timedelta(hours=rv.lookahead_h))
    queued = read_queue(storage)
    ours = {str(i) for f in [*lake.frames.values(), *lake.held_frames.values()] for i in f["event_id"]}
    others = queued[queued["target_event_id"].isin(ours)].reset_index(drop=True)
    review = ReviewInput(rv, start, end, latest_decisions(lake.reviews), others, unify_feedback(lake.held_frames),
                         route=route_review)
    ds = build_dataset(lake.turns, unify_feedback(lake.frames), FilterConfig.from_settings(c), eval_share=c.eval_share,
                       held=lake.held, review=review)
    result = publish_dataset(storage, ds, start=start, end=end, partitions=lake.files, lake_uri=settings.lake.uri)
    if route_review and ds.review_items is not None:  # again: keep what the loop added to the items (its view)
        items, views = ds.review_items, dict(zip(queued["item_id"], queued["model_view"], strict=True))
        items["model_view"] = [views.get(i) or v for i, v in zip(items["item_id"], items["model_view"], strict=True)]
        write_queue(storage, items, start=start, end=end, part="filters")
    m = result.manifest
    log.info("curated %s: %d feedback events read (+%d held at ingest), %d held back %s, %d pairs %s, agreement %s",
             result.version, m["feedback_read"], m["held_at_ingest"], m["held_back"],
             {k: v for k, v in m["held_back_by_reason"].items() if v}, len(ds.pairs), m["pairs_by_source"], m["agreement"])
    r = m["review"]
    log.info("review: %d items routed %s, %d reviewed %s, rejected %s, filters' precision %s", r["routed"],
             r["routed_by_route"], r["reviewed"], r["outcomes"], r["rejected_by_reason"],
             r["filter_precision"]["precision"])
    return result


__all__ = ["REASONS", "Dataset", "build_dataset", "curate", "publish_dataset"]
