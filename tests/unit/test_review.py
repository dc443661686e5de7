"""The review queue's rules: routing, outcomes of several reviewers, Cohen's kappa, and curation honouring them."""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from flywheel.settings import ReviewSettings
from ingest.filters import FilterConfig
from pipelines.curation import ReviewInput, build_dataset
from pipelines.review import cohen_kappa, latest_decisions, outcomes, review_stats, reviewers_needed

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
START, END = T0, T0 + timedelta(hours=1)


def ts(seconds: float) -> pd.Timestamp:
    return pd.Timestamp(T0 + timedelta(seconds=seconds))


def lake(n: int = 4) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``n`` turns, each corrected by its own user, plus one correction the filters hold back (one word)."""
    turns = pd.DataFrame([{"event_id": f"t{i}", "response_id": f"r{i}", "user_id": "svc", "occurred_at": ts(i),
                           "response": f"The answer number {i} is Lyon, in the south of the country.",
                           "model_version": "m@1", "conversation_id": f"c{i}",
                           "messages": [{"role": "user", "content": f"Question {i}: what is the capital?"}]}
                          for i in range(n)])
    rows = [{"event_id": f"f{i}", "type": "correction", "user_id": f"u{i}", "occurred_at": ts(120 + i),
             "response_id": f"r{i}", "other_response_id": None, "value": None,
             "corrected_text": f"The answer number {i} is Paris, in the north of the country."} for i in range(n)]
    rows.append({"event_id": "short", "type": "correction", "user_id": "ux", "occurred_at": ts(200),
                 "response_id": "r0", "other_response_id": None, "value": None, "corrected_text": "Paris"})
    return turns, pd.DataFrame(rows)


def decisions(*rows: tuple[str, str, str, str | None, str | None, float]) -> pd.DataFrame:
    """(reviewer, item_id, decision, reason, edited_text, at_seconds)"""
    return latest_decisions(pd.DataFrame([
        {"event_id": f"e{k}", "reviewer": r, "item_id": i, "target_event_id": "", "decision": d, "reason": why,
         "edited_text": text, "occurred_at": ts(at)} for k, (r, i, d, why, text, at) in enumerate(rows)]))


def curated(cfg: ReviewSettings, review_rows=()) -> tuple[object, pd.DataFrame]:
    turns, feedback = lake()
    first = build_dataset(turns, feedback, FilterConfig(), review=ReviewInput(cfg, START, END, decisions()))
    items = first.review_items
    ids = dict(zip(items["target_event_id"], items["item_id"], strict=True))
    rows = [(r, ids[t], d, why, text, at) for r, t, d, why, text, at in review_rows]
    return build_dataset(turns, feedback, FilterConfig(), review=ReviewInput(cfg, START, END, decisions(*rows))), items


def test_curation_routes_every_correction_and_a_sample_of_what_the_filters_held_back():
    ds, items = curated(ReviewSettings(held_back_share=1.0, double_share=0.0))
    routes = dict(zip(items["target_event_id"], items["route"], strict=True))
    assert routes == {"f0": "correction", "f1": "correction", "f2": "correction", "f3": "correction",
                      "short": "held_back"}
    held = items.set_index("target_event_id").loc["short"]
    assert held["filter_reasons"] == '["empty_correction"]' and "held back by the filters" in held["route_reason"]
    item = items.set_index("target_event_id").loc["f2"]
    assert item["proposal"].startswith("The answer number 2 is Paris") and item["conversation_id"] == "c2"
    assert not ds.pairs["reviewed"].any() and ds.stats["review"]["routed"] == 5
    # sampling is by a hash of the event id: the same items every run, about the share asked for
    _, again = curated(ReviewSettings(held_back_share=1.0, double_share=0.0))
    assert again["item_id"].tolist() == items["item_id"].tolist()
    _, none = curated(ReviewSettings(correction_share=0.0, held_back_share=0.0))
    assert none.empty
    _, capped = curated(ReviewSettings(held_back_share=1.0, max_items=2))
    assert capped["route"].tolist() == ["correction", "correction"]  # corrections first


def test_decisions_reject_to_quarantine_fix_the_text_and_mark_accepted_pairs_reviewed():
    ds, _ = curated(ReviewSettings(), [("ana", "f0", "reject", "manipulation", None, 900),
                                       ("ana", "f1", "fix", None, "The answer number 1 is Paris.", 900),
                                       ("ana", "f2", "accept", None, None, 900),
                                       ("ana", "f3", "skip", None, None, 900)])
    q = ds.quarantine.set_index("event_id")["reason"]
    assert q["f0"] == "reviewer_rejected:manipulation" and q["short"] == "empty_correction"
    pairs = ds.pairs.set_index(ds.pairs["event_ids"].map(lambda ids: next(i for i in ids if i.startswith("f"))))
    assert "f0" not in pairs.index
    assert pairs.loc["f1", "chosen"] == "The answer number 1 is Paris." and pairs.loc["f1", "reviewed"]
    assert pairs.loc["f2", "reviewed"] and not pairs.loc["f3", "reviewed"]  # a skip is no review
    assert ds.stats["review"]["held_by_review"] == {"reviewer_rejected:manipulation": 1}
    assert ds.stats["review"]["reviewed_pairs"] == 2


def test_unreviewed_corrections_wait_when_the_setting_says_hold():
    ds, _ = curated(ReviewSettings(unreviewed_corrections="hold"), [("ana", "f2", "accept", None, None, 900)])
    reasons = ds.quarantine.set_index("event_id")["reason"].to_dict()
    assert {k: v for k, v in reasons.items() if v == "awaiting_review"} == {
        "f0": "awaiting_review", "f1": "awaiting_review", "f3": "awaiting_review"}
    assert len(ds.pairs) == 1 and ds.pairs["reviewed"].all()


def test_the_majority_decides_a_tie_is_disputed_and_each_reviewers_latest_decision_counts():
    d = decisions(("ana", "i1", "accept", None, None, 1), ("ben", "i1", "reject", "unclear", None, 2),
                  ("ana", "i2", "reject", "harmful", None, 1), ("ana", "i2", "accept", None, None, 5),  # changed mind
                  ("ana", "i3", "reject", "subjective", None, 1), ("ben", "i3", "reject", "unclear", None, 2),
                  ("cy", "i3", "reject", "unclear", None, 3), ("ana", "i4", "skip", None, None, 1))
    out = outcomes(d)
    assert out["i1"].decision == "disputed" and reviewers_needed(False, out["i1"]) == 3
    assert out["i2"].decision == "accept" and out["i2"].votes == 1
    assert (out["i3"].decision, out["i3"].reason) == ("reject", "unclear")
    assert "i4" not in out and reviewers_needed(True, None) == 2


def test_cohens_kappa_against_hand_computed_values():
    # agree on 2 of 3; p_e = (1*2 + 2*1) / 9 = 4/9; kappa = (2/3 - 4/9) / (5/9) = 0.4
    assert cohen_kappa(["r", "a", "a"], ["r", "r", "a"]) == pytest.approx(0.4)
    assert cohen_kappa(["a", "r", "a", "r"], ["a", "r", "a", "r"]) == 1.0
    assert cohen_kappa(["a", "r"], ["r", "a"]) == -1.0
    assert math.isnan(cohen_kappa(["a", "a"], ["a", "a"])) and math.isnan(cohen_kappa([], []))


def test_review_stats_measure_the_filters_precision_and_each_reviewer():
    turns, feedback = lake()
    cfg = ReviewSettings(held_back_share=1.0, double_share=1.0)
    items = build_dataset(turns, feedback, FilterConfig(), review=ReviewInput(cfg, START, END, decisions())).review_items
    ids = dict(zip(items["target_event_id"], items["item_id"], strict=True))
    d = decisions(("ana", ids["short"], "reject", "unclear", None, 0), ("ben", ids["short"], "reject", "unclear", None, 60),
                  ("ana", ids["f0"], "accept", None, None, 900), ("ben", ids["f0"], "accept", None, None, 120))
    stats = review_stats(items, d)
    assert stats["filter_precision"] == {"reviewed": 1, "confirmed": 1, "precision": 1.0,
                                         "by_filter": {"empty_correction": {"reviewed": 1, "precision": 1.0}}}
    assert stats["reviewers"]["ana"] == {"decided": 2, "skipped": 0, "acceptance_rate": 0.5,
                                         "rejected_by_reason": {"unclear": 1}, "per_hour": 4.0}
    assert stats["kappa"] == [{"reviewers": ["ana", "ben"], "items": 2, "kappa": 1.0, "agreement": 1.0}]
    assert stats["outcomes"] == {"accept": 1, "fix": 0, "reject": 1, "disputed": 0}


def test_the_desk_holds_an_item_for_the_reviewer_it_offered_it_to_and_a_decision_counts_at_once(tmp_path):
    from flywheel.settings import Settings
    from flywheel.storage import open_storage
    from pipelines.review import write_queue
    from serving.review import ReviewDesk

    settings = Settings(home=tmp_path / "home")
    turns, feedback = lake(3)
    items = build_dataset(turns, feedback, FilterConfig(), review=ReviewInput(
        ReviewSettings(double_share=0.0), START, END, decisions())).review_items
    items["target_event_id"] = [str(uuid.uuid5(uuid.NAMESPACE_URL, t)) for t in items["target_event_id"]]  # the lake's ids
    write_queue(open_storage(settings.lake.uri, settings.lake), items, start=START, end=END, part="filters")
    desk = ReviewDesk(settings, refresh_s=0.0)
    a, progress = desk.next_item("ana")
    b, _ = desk.next_item("ben")
    assert a is not None and b is not None and a["item_id"] != b["item_id"]  # single items: one reviewer each
    assert progress == {"decided_by_you": 0, "waiting": 3, "queued": 3}
    assert desk.next_item("ana")[0]["item_id"] == a["item_id"]  # still hers until she decides
    event, repeated = desk.decision_event("ana", a, "reject", "unclear", None)
    assert not repeated and event.target_event_id.hex and event.user_id == a["user_id"]
    desk.record(event)
    again, was = desk.decision_event("ana", a, "reject", "unclear", None)
    assert was and again == event  # the same decision again: the same event, first occurred_at included
    nxt, progress = desk.next_item("ana")
    assert nxt["item_id"] not in (a["item_id"], b["item_id"]) and progress["decided_by_you"] == 1
    assert progress["waiting"] == 2
    c, _ = desk.next_item("cy")
    assert c is None  # the third item is ana's now, the second ben's: nothing left for a third reviewer


def test_a_reviewer_who_changes_their_mind_back_sends_a_new_decision_each_time(tmp_path):
    from flywheel.settings import Settings
    from flywheel.storage import open_storage
    from pipelines.review import write_queue
    from serving.review import ReviewDesk

    settings = Settings(home=tmp_path / "home")
    turns, feedback = lake(1)
    items = build_dataset(turns, feedback, FilterConfig(), review=ReviewInput(
        ReviewSettings(), START, END, decisions())).review_items
    items["target_event_id"] = [str(uuid.uuid5(uuid.NAMESPACE_URL, t)) for t in items["target_event_id"]]
    write_queue(open_storage(settings.lake.uri, settings.lake), items, start=START, end=END, part="filters")
    desk = ReviewDesk(settings, refresh_s=0.0)
    item, _ = desk.next_item("ana")
    ids = []
    for decision, reason in (("accept", None), ("reject", "unclear"), ("accept", None)):
        event, repeated = desk.decision_event("ana", item, decision, reason, None)
        assert not repeated
        desk.record(event)
        ids.append(event.event_id)
        time.sleep(0.002)  # decisions a few milliseconds apart, as requests are
    assert len(set(ids)) == 3  # back to accept is a new event: the lake keeps it, and it is the latest
    latest = desk.decisions()
    assert latest.loc[latest["reviewer"] == "ana", "decision"].tolist() == ["accept"]
    again, repeated = desk.decision_event("ana", item, "accept", None, None)
    assert repeated and again.event_id == ids[-1]

