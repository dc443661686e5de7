"""The worker that runs ``POST /v1/chat`` generations: a bounded queue in front of the model, ordered so that
one long prompt cannot stall the short chats.

Why: an outside tester sent one 30,000-character prompt; it timed out, and the small chats sent meanwhile
timed out with it (every chat went to the shared anyio threadpool and lined up behind the model's lock, with
no bound and no order). The route now caps the prompt (``max_prompt_tokens``, 422 above it) and hands the
generation to this pool:

* **Admission.** At most ``queue_limit`` chats wait; the next is refused at once (:class:`Overloaded`: 503
  with Retry-After) rather than joining a line it would time out in. A chat still waiting ``timeout_s`` after
  it arrived is withdrawn and refused the same way; one that has started runs to its end, which the prompt
  cap and ``max_new_tokens`` bound.
* **One worker thread per model replica** (one here: :class:`~serving.policy.PolicyHandle` serialises
  generation), not the anyio threadpool, so generation never takes the threads other routes use; the route
  awaits a future, so the event loop (``/healthz``, ``/readyz``) never waits on a generation.
* **Order: shortest first with aging, and a long chat yields between its forward passes.** Measured on
  SmolLM2, one core: a short chat (37 prompt tokens, 64 new) takes 0.8 s; a maximal one (2048 prompt tokens,
  64 new) 17 s, 9 s of prefill and 0.1 s a token over the long context. So with the cap alone (FIFO) a chat
  behind a maximal prompt waits twenty short chats' time: the cap does not suffice. Reordering the queue
  alone does not either: a long chat that has the model when the short ones arrive (an idle server that gets
  the long prompt first) keeps it for all 17 s. Hence: a chat's rank is its arrival time plus ``deferral_s``
  times its share of the largest chat's tokens (prompt plus reply, ``full_tokens``); the worker starts the
  lowest rank; and a running generation calls back between forward passes (each ``prefill_chunk`` of its
  prompt, each new token: ``between`` in :meth:`PolicyHandle.generate`), where the worker runs every waiting
  chat that ranks before it, to its end, on the same thread. A short chat then waits at most one prefill
  chunk (~1 s here) or one token of a long one. Aging: a chat is overtaken only by chats that arrive less than
  ``deferral_s`` after it (less for shorter ones), so nothing starves: once a maximal chat is ``deferral_s``
  old it runs to its end whatever keeps arriving.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from flywheel.settings import ApiSettings

T = TypeVar("T")
Between = Callable[[], None]
DEFERRAL_S = 5.0
"""How long after a maximal chat arrives shorter chats may still overtake it (about six short SmolLM2 chats on
one core: long enough to let a burst of short chats through, short against ``chat_timeout_s``)."""


class Overloaded(Exception):
    """The chat was not run: the queue is full, the chat waited too long, or the server is stopping."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Job:
    run: Callable[[Between], Any]
    rank: float
    future: Future[Any]


class GenerationPool:
    """One worker thread and the ranked, bounded queue in front of it (see the module docstring)."""

    def __init__(self, *, queue_limit: int, timeout_s: float, full_tokens: int, registry: CollectorRegistry,
                 deferral_s: float = DEFERRAL_S):
        self.queue_limit, self.timeout_s = queue_limit, timeout_s
        self.full_tokens, self.deferral_s = full_tokens, deferral_s
        self.running = 0  # chats started and not finished (one, or more while a long one lets short ones through)
        self._waiting: list[tuple[float, int, _Job]] = []  # a heap by (rank, arrival order)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._service_s = 1.0  # moving average of a chat's time on the model, for Retry-After
        self._depth = Gauge("flywheel_chat_queue_depth", "Chats waiting for the generation worker",
                            registry=registry)
        self._rejected = Counter("flywheel_chat_rejected", "Chats answered 503 overloaded, by reason", ["reason"],
                                 registry=registry)
        for reason in ("queue_full", "queue_timeout"):
            self._rejected.labels(reason)

    @classmethod
    def from_settings(cls, api: ApiSettings, registry: CollectorRegistry) -> GenerationPool:
        return cls(queue_limit=api.chat_queue_limit, timeout_s=api.chat_timeout_s,
                   full_tokens=api.max_prompt_tokens + api.max_new_tokens, registry=registry)

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> GenerationPool:
        with self._cond:
            self._closed = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="generation", daemon=True)
                self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse the waiting chats, let the running one finish (up to ``timeout_s``), stop the worker."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._depth.set(0)
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        for _, _, job in waiting:
            if job.future.set_running_or_notify_cancel():  # False: its caller has gone
                job.future.set_exception(Overloaded("the server is shutting down", 1.0))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    # -------------------------------------------------------------------------------------------- callers
    def retry_after_s(self) -> float:
        """About how long the chats waiting now will keep the model busy (1 s at least)."""
        return max(min(len(self._waiting) * self._service_s, self.timeout_s), 1.0)

    def submit(self, run: Callable[[Between], Any], *, tokens: int) -> Future[Any]:
        """Queue ``run(between)`` for a chat of ``tokens`` (prompt plus reply); raises :class:`Overloaded` at
        once when ``queue_limit`` chats are waiting already."""
        with self._cond:
            if self._thread is None and not self._closed:
                self.start()  # an app run without its lifespan (the lifespan starts and closes the pool)
            if self._closed:
                raise Overloaded("the server is shutting down", 1.0)
            if len(self._waiting) >= self.queue_limit:
                self._rejected.labels("queue_full").inc()
                raise Overloaded(f"the generation queue is full ({len(self._waiting)} chats waiting for the model, "
                                 "chat_queue_limit); retry after Retry-After seconds", self.retry_after_s())
            job = _Job(run, time.monotonic() + self.deferral_s * min(tokens / self.full_tokens, 1.0), Future())
            heapq.heappush(self._waiting, (job.rank, next(self._order), job))
            self._depth.set(len(self._waiting))
            self._cond.notify()
        return job.future

    async def run(self, run: Callable[[Between], T], *, tokens: int) -> T:
        """:meth:`submit`, then await the result without blocking the event loop. Raises :class:`Overloaded`
        when the queue is full, or when the chat has not started ``timeout_s`` after it arrived."""
        future = self.submit(run, tokens=tokens)
        done = asyncio.wrap_future(future)
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.timeout_s)  # type: ignore[no-any-return]
        except TimeoutError:
            if not self._withdraw(future):
                return await done  # type: ignore[no-any-return]  # it started in time: it runs to its end
            self._rejected.labels("queue_timeout").inc()
            raise Overloaded(f"no model time for {self.timeout_s:g} s (chat_timeout_s); retry after Retry-After "
                             "seconds", self.retry_after_s()) from None
        except asyncio.CancelledError:
            self._withdraw(future)
            raise

    def _withdraw(self, future: Future[Any]) -> bool:
        """Take a chat that has not started out of the queue; False when it has started (or ended)."""
        with self._cond:
            for i, (_, _, job) in enumerate(self._waiting):
                if job.future is future:
                    self._waiting.pop(i)
                    heapq.heapify(self._waiting)
                    self._depth.set(len(self._waiting))
                    future.cancel()
                    return True
        return False

    # --------------------------------------------------------------------------------------------- worker
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._pop()
            self._run(job)

    def _pop(self) -> _Job:
        job = heapq.heappop(self._waiting)[2]
        self._depth.set(len(self._waiting))
        return job

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self.running += 1
        started = time.monotonic()
        try:
            result = job.run(lambda: self._run_ranked_before(job.rank))
        except Exception as e:  # the awaiting route raises it
            job.future.set_exception(e)
        else:
            job.future.set_result(result)
        finally:
            self.running -= 1
            self._service_s = 0.8 * self._service_s + 0.2 * (time.monotonic() - started)

    def _run_ranked_before(self, rank: float) -> None:
        """Between two forward passes of the chat ranked ``rank``: run every waiting chat that ranks before it."""
        while True:
            with self._cond:
                if self._closed or not self._waiting or self._waiting[0][0] >= rank:
                    return
                job = self._pop()
            self._run(job)
