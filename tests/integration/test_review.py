"""Human review end to end: curation routes corrections to the queue, reviewers decide through the API (and the
page, in real headless Chromium), the decisions travel API -> Kafka -> lake, and curation honours them."""

from __future__ import annotations

import os
import secrets
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from flywheel.app.stack import free_port
from flywheel.settings import ApiKey, hash_api_key
from flywheel.storage import open_storage
from ingest.lake import read_events
from pipelines.curation import curate
from pipelines.dataset import open_dataset
from pipelines.review import read_queue
from serving.app import create_app
from serving.server import BackgroundServer
from tests.integration.helpers import consumer_thread, wait_for_rows

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC).replace(microsecond=0)
START, END = NOW - timedelta(hours=1), NOW + timedelta(minutes=1)
ANSWERS = [  # (question, the model's answer, the user's correction)
    ("What is the capital of France?", "The capital of France is Lyon, a large city in the south.",
     "The capital of France is Paris, a large city in the north."),
    ("How many legs does a spider have?", "A spider has six legs, like every insect has.",
     "A spider has eight legs; it is an arachnid, not an insect."),
    ("What does a thermometer measure?", "A thermometer measures air pressure in a room.",
     "A thermometer measures temperature, in a room or anywhere else."),
]


def keys(settings) -> dict[str, str]:
    """Secrets of an ordinary client key and of two reviewers."""
    out = {name: secrets.token_urlsafe(16) for name in ("app", "ana", "ben")}
    settings.api.keys = [ApiKey(name=n, sha256=hash_api_key(s), reviewer=n != "app") for n, s in out.items()]
    return out


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def log_corrections(client: httpx.Client, secret: str) -> list[str]:
    """Three turns and a correction of each through the API; the corrections' event ids."""
    ids = []
    for i, (question, answer, fixed) in enumerate(ANSWERS):
        rid = f"resp-{uuid.uuid4().hex[:8]}"
        turn = {"conversation_id": f"conv-{i}", "user_id": f"user-{i}", "model_version": "v1", "response_id": rid,
                "messages": [{"role": "user", "content": question}], "response": answer,
                "occurred_at": (NOW - timedelta(minutes=30)).isoformat()}
        assert client.post("/v1/turns", json=turn, headers=auth(secret)).status_code == 202
        eid = str(uuid.uuid4())
        fb = {"type": "correction", "event_id": eid, "conversation_id": f"conv-{i}", "user_id": f"user-{i}",
              "model_version": "v1", "response_id": rid, "corrected_text": fixed,
              "occurred_at": (NOW - timedelta(minutes=25) + timedelta(seconds=i)).isoformat()}
        assert client.post("/v1/feedback", json=fb, headers=auth(secret)).status_code == 202
        ids.append(eid)
    return ids


def queued(settings, client, secret) -> list[str]:
    """Corrections logged and curated: the queue's item ids, in the order of the corrections."""
    ids = log_corrections(client, secret)
    wait_for_rows(settings, 2 * len(ANSWERS))
    curate(settings, START, END)
    items = read_queue(open_storage(settings.lake.uri, settings.lake))
    by_target = dict(zip(items["target_event_id"], items["item_id"], strict=True))
    assert set(ids) <= set(by_target), "every correction that passed the filters is routed to review"
    return [by_target[i] for i in ids]


def reviews_in_lake(settings, n: int, timeout: float = 60.0):
    storage = open_storage(settings.lake.uri, settings.lake)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        df = read_events(storage, "review")
        if len(df) >= n:
            return df
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} review events reached the lake")


def test_review_endpoints_refuse_the_wrong_keys_and_bad_input_and_a_repeat_is_idempotent(settings):
    secret = keys(settings)
    settings.review.double_share = 1.0
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        items = queued(settings, client, secret["app"])
        url = f"/v1/review/items/{items[0]}/decision"
        # roles: no key 401, a key without the reviewer role 403 (every endpoint)
        assert client.get("/v1/review/next").status_code == 401
        for method, path in (("GET", "/v1/review/next"), ("GET", "/v1/review/stats"),
                             ("GET", f"/v1/review/items/{items[0]}"), ("POST", url)):
            r = client.request(method, path, json={"decision": "accept"}, headers=auth(secret["app"]))
            assert r.status_code == 403 and "reviewer role" in r.json()["message"], (path, r.text)
        ana = auth(secret["ana"])
        # a review event is no feedback: the chat service's endpoints refuse it
        forged = {"type": "review", "conversation_id": "c", "user_id": "u", "model_version": "v1", "reviewer": "app",
                  "item_id": items[0], "target_event_id": str(uuid.uuid4()), "decision": "accept"}
        assert client.post("/v1/feedback", json=forged, headers=auth(secret["app"])).status_code == 422
        assert client.post("/v1/feedback/batch", json={"events": [forged]}, headers=auth(secret["app"])).status_code == 422
        assert client.get("/v1/review/items/rv-c-0000000000000000", headers=ana).status_code == 404
        assert client.post("/v1/review/items/nope/decision", json={"decision": "skip"}, headers=ana).status_code == 404
        # bad input: a 4xx that says what to fix, never a 5xx
        bad = [({"decision": "reject"}, "reason is required"), ({"decision": "accept", "reason": "unclear"}, "reason"),
               ({"decision": "fix"}, "edited_text is required"), ({"decision": "maybe"}, "decision"),
               ({"decision": "reject", "reason": "boring"}, "reason"), ({"decision": "fix", "edited_text": ""}, "edited_text"),
               ({"decision": "accept", "extra": 1}, "extra"), ([1, 2], "body"), ("not json", ""),
               ({"decision": "fix", "edited_text": "   "}, "blank"),
               ({"decision": "fix", "edited_text": "x" * 40_000}, "32000"),  # the consumer would dead-letter it
               ({"decision": "accept", "edited_text": "Paris."}, "edited_text")]
        for body, fragment in bad:
            r = client.post(url, json=body, headers=ana) if body != "not json" else \
                client.post(url, content=b"{nope", headers={**ana, "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500 and fragment in r.text, (body, r.status_code, r.text)
        r = client.post(url, content=b'{"decision": "accept"}', headers={**ana, "Content-Type": "text/plain"})
        assert r.status_code == 415
        # the page shows the item; a decision is 202 and a repeat is the same event, sent once more
        item = client.get(f"/v1/review/items/{items[0]}", headers=ana).json()
        assert item["proposal"] == ANSWERS[0][2] and item["response"] == ANSWERS[0][1] and item["route"] == "correction"
        assert item["messages"] == [{"role": "user", "content": ANSWERS[0][0]}]
        first = client.post(url, json={"decision": "reject", "reason": "factually_wrong"}, headers=ana)
        again = client.post(url, json={"decision": "reject", "reason": "factually_wrong"}, headers=ana)
        assert first.status_code == again.status_code == 202, first.text
        assert first.json()["event_id"] == again.json()["event_id"] and again.json()["repeated"]
        fixed = client.post(f"/v1/review/items/{items[1]}/decision", headers=ana,
                            json={"decision": "fix", "edited_text": "A spider has eight legs."})
        assert fixed.status_code == 202
        lake = reviews_in_lake(settings, 2)
        time.sleep(2)  # a late duplicate would have landed by now (the consumer flushes every 0.5 s)
        lake = read_events(open_storage(settings.lake.uri, settings.lake), "review")
        assert list(lake["event_id"]).count(first.json()["event_id"]) == 1 and len(lake) == 2
        # the next item for ana is one she has not decided
        nxt = client.get("/v1/review/next", headers=ana).json()
        assert nxt["item"]["item_id"] == items[2] and nxt["progress"]["decided_by_you"] == 2


def test_a_reviewer_rejects_with_the_keyboard_and_curation_and_kappa_follow(settings, tmp_path):
    """Real headless Chromium (Debian's) driven by Playwright."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        if os.environ.get("FLYWHEEL_CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    expect = playwright_api.expect
    secret = keys(settings)
    settings.review.double_share = 1.0  # every item is decided by two reviewers: their agreement is measured
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client, playwright_api.sync_playwright() as pw:
        items = queued(settings, client, secret["app"])
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        outside: list[str] = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(srv.url) else None)
        page.goto(f"{srv.url}/review")
        page.fill("#key", secret["ana"])
        page.keyboard.press("Enter")
        page.wait_for_selector("#item:not(.hidden)")
        assert page.inner_text("#proposal") == ANSWERS[0][2]
        assert page.inner_text("#item-id") == items[0] and "ana" in page.inner_text("#who")
        shots = Path(os.environ.get("FLYWHEEL_SCREENSHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / "review-page.png"))
        # reject with a reason, by the keyboard: r, then 1 (unclear); then accept the other two
        page.keyboard.press("r")
        page.wait_for_selector("#reasons.open")
        page.keyboard.press("1")
        expect(page.locator("#item-id")).to_have_text(items[1])
        assert "Recorded: reject (unclear)" in page.inner_text("#status")
        page.keyboard.press("a")
        expect(page.locator("#item-id")).to_have_text(items[2])
        page.keyboard.press("a")
        page.wait_for_selector("#empty:not(.hidden)")
        assert page.inner_text("#counters").startswith("3 decided by you")
        # a second reviewer on the same items, through the API: agrees on two of three
        for item, body in zip(items, ({"decision": "reject", "reason": "unclear"},
                                      {"decision": "reject", "reason": "subjective"}, {"decision": "accept"}), strict=True):
            assert client.post(f"/v1/review/items/{item}/decision", json=body, headers=auth(secret["ben"])).status_code == 202
        lake = reviews_in_lake(settings, 6)
        ana_reject = lake[(lake["reviewer"] == "ana") & (lake["item_id"] == items[0])]
        assert len(ana_reject) == 1 and ana_reject["decision"].iloc[0] == "reject"
        assert ana_reject["reason"].iloc[0] == "unclear"
        # the statistics page: kappa of ana and ben over the three items (agree on 2 of 3, kappa 0.4)
        page.goto(f"{srv.url}/review/stats")
        page.wait_for_selector("#kappa tbody tr")
        assert page.inner_text("#kappa tbody tr").split("\t") == ["ana / ben", "3", "0.4", "0.6667"]
        assert outside == []  # nothing fetched from another host
        browser.close()
    # curating the interval again: the rejected correction is in quarantine with the reviewers' reason, the
    # disputed one (ana accepted, ben rejected) waits for a third reviewer, the accepted one is a reviewed pair
    ds = open_dataset(curate(settings, START, END).version, settings)
    quarantine = ds.table("quarantine").set_index("event_id")
    target = read_queue(open_storage(settings.lake.uri, settings.lake)).set_index("item_id").loc[items[0]]
    assert quarantine.loc[target["target_event_id"], "reason"] == "reviewer_rejected:unclear"
    pairs = ds.table("pairs")
    assert pairs["reviewed"].sum() == 1
    review = ds.manifest["review"]
    assert review["outcomes"] == {"accept": 1, "fix": 0, "reject": 1, "disputed": 1}
    assert review["kappa"] == [{"reviewers": ["ana", "ben"], "items": 3, "kappa": 0.4, "agreement": 0.6667}]


def test_the_demos_simulated_reviewers_work_the_queue_through_the_api_and_the_report_shows_it(settings, tmp_path):
    """What ``flywheel demo`` does each cycle (with ``--reviewers``), on a small queue: reviewers who know the
    truth, one of them always wrong, decide every item through the HTTP endpoints; the report has the section."""
    from flywheel.app.demo_report import review_section
    from flywheel.app.reviewers import SimReviewer, right_call, work_queue

    secret = keys(settings)
    settings.review.double_share = 1.0
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        items = queued(settings, client, secret["app"])
        queue = read_queue(open_storage(settings.lake.uri, settings.lake)).set_index("item_id")
        adversary = queue.loc[items[0], "target_event_id"]
        truth = {"adversarial_events": {adversary: "brigade"}}
        first = queue.loc[items[0]].to_dict() | {"item_id": items[0]}
        assert right_call(first, truth, None) == ("reject", "manipulation")
        assert right_call(queue.loc[items[1]].to_dict(), truth, None) == ("accept", None)
        done = work_queue(client, [SimReviewer("ana", secret["ana"], 0.0), SimReviewer("ben", secret["ben"], 1.0)],
                          truth, None)
        assert done["decisions"] == {"ana": 3, "ben": 3} and done["wrong_calls"] == {"ben": 3}
        reviews_in_lake(settings, 6)
    ds = open_dataset(curate(settings, START, END, route_review=False).version, settings)
    review = ds.manifest["review"]
    assert review["outcomes"]["disputed"] == 3  # ana right, ben wrong on every item: a third reviewer is due
    section = "\n".join(review_section([{"number": 1, "review": review | {"simulated": done}}]))
    assert "## Human review" in section and "ana (error rate 0%), ben (error rate 100%)" in section
    assert "| 1 | 3 (3 / 0 / 0) | 3 | 0 |" in section
