"""The generation pool's order, admission and deadline, and ``PolicyHandle.generate``'s ``between`` path."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from serving.generation_pool import GenerationPool, Overloaded
from serving.policy import PolicyHandle
from tests.tiny import tiny_causal_lm, tiny_tokenizer


def pool(**kw) -> tuple[GenerationPool, CollectorRegistry]:
    registry = CollectorRegistry()
    args = dict(queue_limit=8, timeout_s=5.0, full_tokens=1000, registry=registry, deferral_s=5.0) | kw
    return GenerationPool(**args).start(), registry


def blocker(started: threading.Event, release: threading.Event, done: list[str], name: str = "first"):
    def run(_between):
        started.set()
        release.wait(5)
        done.append(name)
    return run


def record(done: list[str], name: str):
    return lambda _between: done.append(name)


def test_waiting_chats_run_shortest_first_and_equal_ones_in_arrival_order():
    p, _ = pool()
    started, release, done = threading.Event(), threading.Event(), []
    p.submit(blocker(started, release, done), tokens=10)
    assert started.wait(5)
    futures = [p.submit(record(done, name), tokens=tokens)
               for name, tokens in [("long", 900), ("short-a", 20), ("mid", 400), ("short-b", 20)]]
    release.set()
    for f in futures:
        f.result(5)
    assert done == ["first", "short-a", "short-b", "mid", "long"]
    p.close()


def test_a_chat_is_overtaken_only_by_chats_that_arrive_within_the_deferral():
    p, _ = pool(deferral_s=0.2)
    started, release, done = threading.Event(), threading.Event(), []
    p.submit(blocker(started, release, done), tokens=10)
    assert started.wait(5)
    futures = [p.submit(record(done, "long"), tokens=1000)]  # ranked 0.2 s after its arrival
    time.sleep(0.3)
    futures.append(p.submit(record(done, "short"), tokens=1))  # arrives after that: cannot overtake
    release.set()
    for f in futures:
        f.result(5)
    assert done == ["first", "long", "short"]
    p.close()


def test_a_running_chat_lets_shorter_ones_through_between_its_steps_but_not_longer_ones():
    p, _ = pool()
    done: list[str] = []
    arrived = threading.Event()
    futures = []

    def long_chat(between):
        for step in range(50):
            if step == 5:
                futures.append(p.submit(record(done, "short"), tokens=5))
                futures.append(p.submit(record(done, "longer"), tokens=1000))
                arrived.set()
            between()
            if step in (4, 49):
                done.append(f"long-{step}")
        return "long"

    assert p.submit(long_chat, tokens=600).result(5) == "long"
    assert arrived.is_set() and [f.result(5) for f in futures] == [None, None]
    assert done == ["long-4", "short", "long-49", "longer"]
    p.close()


def test_a_full_queue_refuses_at_once_and_a_chat_past_its_deadline_is_withdrawn():
    p, registry = pool(queue_limit=1, timeout_s=0.3)
    started, release, done = threading.Event(), threading.Event(), []
    p.submit(blocker(started, release, done), tokens=10)
    assert started.wait(5)

    async def two_more():
        waiting = asyncio.ensure_future(p.run(record(done, "waits"), tokens=10))
        await asyncio.sleep(0.05)
        t = time.monotonic()
        with pytest.raises(Overloaded, match="chat_queue_limit") as full:
            await p.run(record(done, "refused"), tokens=10)
        assert time.monotonic() - t < 0.05 and full.value.retry_after_s >= 1
        with pytest.raises(Overloaded, match="chat_timeout_s"):
            await waiting

    asyncio.run(two_more())
    assert registry.get_sample_value("flywheel_chat_queue_depth") == 0  # the withdrawn chat left the queue
    release.set()
    time.sleep(0.1)
    assert done == ["first"]
    assert registry.get_sample_value("flywheel_chat_rejected_total", {"reason": "queue_full"}) == 1
    assert registry.get_sample_value("flywheel_chat_rejected_total", {"reason": "queue_timeout"}) == 1
    p.close()


def test_closing_refuses_the_waiting_chats_and_errors_reach_the_caller():
    p, _ = pool()
    started, release, done = threading.Event(), threading.Event(), []
    p.submit(blocker(started, release, done), tokens=10)
    assert started.wait(5)
    waiting = p.submit(record(done, "never"), tokens=10)
    threading.Timer(0.1, release.set).start()
    p.close()
    with pytest.raises(Overloaded, match="shutting down"):
        waiting.result(1)
    with pytest.raises(Overloaded, match="shutting down"):
        p.submit(record(done, "late"), tokens=1)
    assert done == ["first"]

    p, _ = pool()
    with pytest.raises(ZeroDivisionError):
        p.submit(lambda _between: 1 / 0, tokens=1).result(5)
    assert p.submit(lambda _between: "still serving", tokens=1).result(5) == "still serving"
    p.close()


def test_generate_with_between_gives_the_same_reply_and_calls_back_after_every_chunk_and_token():
    import torch

    tok = tiny_tokenizer()
    handle = PolicyHandle(tiny_causal_lm(len(tok)), tok, "tiny@v1", temperature=0.0, prefill_chunk=16)
    messages = [{"role": "user", "content": " ".join(["what is the capital of france"] * 10)}]
    n = handle.prompt_tokens(messages)
    assert n == 64  # "user" ":" 60 words "assistant" ":"
    calls = []
    plain = handle.generate(messages, 12)
    stepped = handle.generate(messages, 12, between=lambda: calls.append(1))
    assert stepped == plain
    prefill_chunks = -(-(n - 1) // 16)
    assert prefill_chunks + 1 <= len(calls) <= prefill_chunks + 12  # each chunk, then each new token (EOS ends it)

    sampling = PolicyHandle(handle.model, tok, "tiny@v1", temperature=1.0, prefill_chunk=16)
    quiet = sampling.generate(messages, 12, seed=7, between=lambda: None)
    noisy = sampling.generate(messages, 12, seed=7, between=lambda: (torch.manual_seed(123), torch.rand(100)))
    assert noisy == quiet  # what runs in between (another seeded chat) leaves this reply alone
