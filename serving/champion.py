"""Serving the registry's champion: follow the ``champion`` alias, swap models without dropping requests.

:class:`ChampionPolicy` answers like a :class:`~serving.policy.PolicyHandle` (``generate`` -> ``Reply``,
``prompt_tokens``) but holds the handle of ``models:/flywheel-policy@champion`` and, when ``canary_share > 0``,
the handle of ``@challenger`` too. :meth:`refresh` reads both aliases; when one points to a new version it
loads that version *beside* the serving one and then replaces the reference in one assignment. A request picks its
handle once, at the start, and keeps it to the end, so requests in flight finish on the model they started
with and nothing waits for a load. ``refresh`` runs every ``poll_s`` seconds on a background thread and on
demand (``POST /v1/admin/reload``, and after an admin promote or rollback).

Every reply carries the version that produced it (``flywheel-policy/3``); that string is the turn's
``model_version`` in the lake.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from flywheel.settings import Settings
from serving.policy import PolicyHandle, Reply, policy_version_label
from training.generation import load_causal_lm, registered_policy_dir
from training.tracking import POLICY_MODEL

log = logging.getLogger(__name__)


class ChampionPolicy:
    def __init__(self, settings: Settings, *, model: str = POLICY_MODEL, canary_share: float = 0.0,
                 poll_s: float = 0.0, loader: Any = None):
        if not 0 <= canary_share <= 1:
            raise ValueError(f"canary_share must be in [0, 1], got {canary_share}")
        self.settings, self.model, self.canary_share, self.poll_s = settings, model, canary_share, poll_s
        self._loader = loader or self._load_version
        self._handles: dict[str, PolicyHandle | None] = {"champion": None, "challenger": None}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.swaps = 0

    # ----------------------------------------------------------------------------------------- loading
    def _load_version(self, version: str) -> PolicyHandle:
        path = registered_policy_dir(f"models:/{self.model}/{version}")
        lm, tok = load_causal_lm(str(path))
        return PolicyHandle(lm, tok, policy_version_label(self.model, version))

    def _alias(self, alias: str) -> str | None:
        from training.registry import alias_version, registry_client

        return alias_version(registry_client(self.settings), self.model, alias)

    def refresh(self) -> dict[str, str | None]:
        """Load whatever the aliases point to now, if it is not what is served; returns the served versions."""
        with self._refresh_lock:
            wanted = {"champion": self._alias("champion"),
                      "challenger": self._alias("challenger") if self.canary_share > 0 else None}
            for role, version in wanted.items():
                current = self._handles[role]
                label = policy_version_label(self.model, version) if version else None
                if current is not None and current.version == label:
                    continue
                if version is None:
                    if role == "challenger":
                        self._handles[role] = None
                    continue
                handle = self._loader(version)  # loaded beside the serving one
                self._handles[role] = handle  # one assignment: the swap
                self.swaps += 1
                log.info("serving %s %s (was %s)", role, handle.version, current.version if current else None)
            return self.versions()

    def versions(self) -> dict[str, str | None]:
        return {role: h.version if h else None for role, h in self._handles.items()}

    # ---------------------------------------------------------------------------------------- serving
    def pick(self) -> PolicyHandle:
        champion, challenger = self._handles["champion"], self._handles["challenger"]
        if champion is None:
            raise RuntimeError(f"no champion loaded for {self.model}")
        if challenger is not None and self.canary_share > 0 and self._rng.random() < self.canary_share:
            return challenger
        return champion

    @property
    def version(self) -> str:
        return self.pick().version

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The prompt's length in tokens for whichever served handle answers it (the larger count when a
        challenger with another tokenizer takes a canary share)."""
        handles = [h for h in self._handles.values() if h is not None]
        if not handles:
            raise RuntimeError(f"no champion loaded for {self.model}")
        return max(h.prompt_tokens(messages) for h in handles)

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, *, seed: int | None = None,
                 between: Callable[[], None] | None = None) -> Reply:
        return self.pick().generate(messages, max_new_tokens, seed=seed, between=between)

    # ---------------------------------------------------------------------------------------- polling
    def start(self) -> ChampionPolicy:
        if self.refresh()["champion"] is None:
            raise RuntimeError(f"{self.model} has no 'champion' alias: run `flywheel bootstrap` (registers the base "
                               "policy as version 1) or promote a version")
        if self.poll_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="champion-poll", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # a registry hiccup must not kill serving; the next poll tries again
                log.exception("champion refresh failed; still serving %s", self.versions())

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
