"""``POST /v1/chat`` under load, over real HTTP with the real broker: the prompt cap, a maximal prompt among
small chats, a full queue and a chat past its deadline.

The model is a random Llama small enough that a short chat is quick and large enough that a long context
costs time (``slow_policy``): on one core a small chat takes ~60 ms and a maximal 4096-token prompt ~4 s, more
than twice what ten small chats take together. So without the pool's interleaving the small chats behind a
maximal prompt would take more than twice their usual time, and the acceptance test would fail (it does, with
the worker's ``between`` turned off)."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from flywheel.app.stack import free_port
from flywheel.settings import Settings
from serving.app import app_state, create_app
from serving.policy import PolicyHandle
from serving.server import BackgroundServer
from tests.tiny import WORDS, tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.integration

MAX_PROMPT = 4096
SMALL = [{"role": "user", "content": "what is the capital of france"}]


def slow_policy() -> PolicyHandle:
    """Greedy, and EOS never comes, so a chat costs exactly its ``max_new_tokens`` steps every time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=MAX_PROMPT + 64, pad_token_id=0, bos_token_id=2,
        eos_token_id=3)).eval()
    lm.generation_config.suppress_tokens = [tok.eos_token_id]
    return PolicyHandle(lm, tok, "slow@v1", temperature=0.0, prefill_chunk=64)


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


def at_once(url: str, secret: str, bodies: list[dict[str, Any]]) -> list[tuple[int, float, httpx.Response]]:
    """Each body POSTed to /v1/chat from its own thread and connection, all released together; returns
    (status, seconds, response) in the bodies' order."""
    clients = [httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=60)
               for _ in bodies]
    for c in clients:
        c.get("/healthz")  # connected before the clock starts
    barrier = threading.Barrier(len(bodies))

    def one(i: int) -> tuple[int, float, httpx.Response]:
        barrier.wait()
        started = time.perf_counter()
        r = clients[i].post("/v1/chat", json=bodies[i])
        return r.status_code, time.perf_counter() - started, r

    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(one, range(len(bodies))))
    finally:
        for c in clients:
            c.close()


class HealthzPoller:
    """GET /healthz every ~50 ms on a thread; ``latencies`` holds every answer's time."""

    def __init__(self, url: str):
        self.url, self.latencies, self.statuses = url, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._stop.is_set():
                started = time.perf_counter()
                self.statuses.add(c.get("/healthz").status_code)
                took = time.perf_counter() - started
                self.latencies.append(took)
                self._stop.wait(max(0.05 - took, 0))

    def __enter__(self) -> HealthzPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def chat_body(messages: list[dict[str, str]], max_new_tokens: int, user: str = "u1") -> dict[str, Any]:
    return {"user_id": user, "messages": messages, "max_new_tokens": max_new_tokens}


def no_500(url: str) -> None:
    metrics = httpx.get(f"{url}/metrics").text
    assert 'status="500"' not in metrics, [ln for ln in metrics.splitlines() if 'status="500"' in ln]


def test_a_prompt_over_the_token_cap_is_422_naming_the_limit_and_one_at_the_cap_is_answered(settings: Settings,
                                                                                               api_secret: str):
    settings.api.max_prompt_tokens = 64
    tok = tiny_tokenizer()
    policy = PolicyHandle(tiny_causal_lm(len(tok)), tok, "tiny@v7")
    overhead = policy.prompt_tokens([{"role": "user", "content": ""}])  # "user" ":" ... "assistant" ":"
    at_cap = [{"role": "user", "content": words(64 - overhead)}]
    over = [{"role": "system", "content": "hello"}, {"role": "user", "content": words(64 - overhead)}]
    assert policy.prompt_tokens(at_cap) == 64 and policy.prompt_tokens(over) == 64 + 3  # "system" ":" "hello"
    with TestClient(create_app(settings, policy=policy)) as c:
        c.headers["Authorization"] = f"Bearer {api_secret}"
        r = c.post("/v1/chat", json=chat_body(at_cap, 4))
        assert r.status_code == 200 and r.json()["model_version"] == "tiny@v7", r.text

        r = c.post("/v1/chat", json=chat_body(over, 4))
        assert r.status_code == 422 and r.json()["error"] == "prompt_too_long", r.text
        message = r.json()["message"]
        assert "67 tokens" in message and "limit of 64" in message and "max_prompt_tokens" in message, message
        assert r.json()["fields"] == [{"field": "messages", "message": "67 tokens, over 64"}]

        # far beyond what 64 tokens can hold (100 characters a token): refused without tokenizing it
        huge = [{"role": "user", "content": "x" * (64 * 100 + 1)}]
        r = c.post("/v1/chat", json=chat_body(huge, 4))
        assert r.status_code == 422 and r.json()["error"] == "prompt_too_long", r.text
        assert "6401 characters" in r.json()["message"] and "64 tokens" in r.json()["message"]


def test_a_maximal_prompt_does_not_hold_up_small_chats_and_healthz_stays_fast(settings: Settings, api_secret: str):
    """Ten small chats at once, first alone and then while a maximal prompt has the model (the worst case: it
    arrived first, so reordering the queue alone would leave them all behind it). Criterion: the median and the
    slowest of the ten with the maximal prompt are within twice the median and the slowest of the ten without
    it (ten at once on one model is a line, so per-rank comparison, not one chat's time, is the fair baseline).
    Premise, checked: the maximal prompt alone takes longer than the ten small chats together, so behind it
    (FIFO, no interleaving) both figures would more than double. /healthz answers in under 100 ms throughout."""
    settings.api.max_prompt_tokens = MAX_PROMPT
    policy = slow_policy()
    big = [{"role": "user", "content": words(MAX_PROMPT - 4)}]
    assert policy.prompt_tokens(big) == MAX_PROMPT
    new = 8
    app = create_app(settings, policy=policy)
    generation = app_state(app).generation
    assert generation is not None
    with BackgroundServer(app, port=free_port()) as server:
        url = server.url
        at_once(url, api_secret, [chat_body(SMALL, new)] * 2)  # warm up
        [(_, big_alone, _)] = at_once(url, api_secret, [chat_body(big, new)])
        with HealthzPoller(url) as health:
            usual = at_once(url, api_secret, [chat_body(SMALL, new, f"u{i}") for i in range(10)])
            with ThreadPoolExecutor(1) as one:
                big_call = one.submit(at_once, url, api_secret, [chat_body(big, new, "big")])
                deadline = time.monotonic() + 10
                while generation.running == 0 and time.monotonic() < deadline:
                    time.sleep(0.002)
                assert generation.running == 1, "the maximal prompt never reached the model"
                mixed = at_once(url, api_secret, [chat_body(SMALL, new, f"u{i}") for i in range(10)])
                [(big_status, big_mixed, big_response)] = big_call.result(60)
        no_500(url)

    assert {s for s, _, _ in usual + mixed} == {200} and big_status == 200, big_response.text
    usual_s, mixed_s = sorted(t for _, t, _ in usual), sorted(t for _, t, _ in mixed)
    report = (f"small chats at once: usual median {statistics.median(usual_s) * 1000:.0f} ms, slowest "
              f"{usual_s[-1] * 1000:.0f} ms; with the maximal prompt median {statistics.median(mixed_s) * 1000:.0f} "
              f"ms, slowest {mixed_s[-1] * 1000:.0f} ms; maximal prompt alone {big_alone * 1000:.0f} ms, among "
              f"them {big_mixed * 1000:.0f} ms; /healthz max {max(health.latencies) * 1000:.1f} ms over "
              f"{len(health.latencies)} polls")
    print(report)
    assert big_alone > usual_s[-1], f"the maximal prompt is too cheap for this test to mean anything: {report}"
    assert statistics.median(mixed_s) <= 2 * statistics.median(usual_s), report
    assert mixed_s[-1] <= 2 * usual_s[-1], report
    assert health.statuses == {200} and len(health.latencies) >= 10, report
    assert max(health.latencies) < 0.1, report


def test_a_full_queue_answers_503_overloaded_with_retry_after_at_once(settings: Settings, api_secret: str):
    settings.api.chat_queue_limit = 1
    app = create_app(settings, policy=slow_policy())
    with BackgroundServer(app, port=free_port()) as server:
        results = at_once(server.url, api_secret, [chat_body(SMALL, 300, f"u{i}") for i in range(4)])
        metrics = httpx.get(f"{server.url}/metrics").text
        no_500(server.url)

    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 2, statuses
    fastest_answer = min(t for s, t, _ in results if s == 200)
    for status, took, r in results:
        if status == 503:
            assert r.json()["error"] == "overloaded" and "chat_queue_limit" in r.json()["message"], r.text
            assert int(r.headers["retry-after"]) >= 1
            assert took < min(1.0, fastest_answer / 2), (took, fastest_answer)  # refused, not queued
    assert f'flywheel_chat_rejected_total{{reason="queue_full"}} {statuses.count(503)}.0' in metrics
    assert "flywheel_chat_queue_depth 0.0" in metrics


def test_a_chat_that_cannot_start_before_its_deadline_is_503_not_a_hang(settings: Settings, api_secret: str):
    settings.api.chat_timeout_s = 0.5
    app = create_app(settings, policy=slow_policy())
    generation = app_state(app).generation
    assert generation is not None
    with BackgroundServer(app, port=free_port()) as server:
        with ThreadPoolExecutor(1) as one:
            first = one.submit(at_once, server.url, api_secret, [chat_body(SMALL, 300, "first")])
            deadline = time.monotonic() + 10
            while generation.running == 0 and time.monotonic() < deadline:
                time.sleep(0.002)
            [(status, took, r)] = at_once(server.url, api_secret, [chat_body(SMALL, 300, "second")])
            [(first_status, first_took, _)] = first.result(60)
        metrics = httpx.get(f"{server.url}/metrics").text
        no_500(server.url)

    assert status == 503 and r.json()["error"] == "overloaded" and "chat_timeout_s" in r.json()["message"], r.text
    assert int(r.headers["retry-after"]) >= 1
    assert 0.5 <= took < first_took, (took, first_took)  # gave up at its deadline, before the first finished
    assert first_status == 200
    assert 'flywheel_chat_rejected_total{reason="queue_timeout"} 1.0' in metrics
