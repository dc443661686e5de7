"""Bearer API keys (stored hashed) and token-bucket rate limits: per key, and per address for failed logins."""

from __future__ import annotations

import hmac
import math
import threading
import time

from flywheel.settings import ApiKey, hash_api_key


class KeyRing:
    """Looks a presented secret up by its SHA-256; the secrets themselves are never stored."""

    def __init__(self, keys: list[ApiKey]):
        self._keys = list(keys)

    def authenticate(self, secret: str) -> ApiKey | None:
        digest = hash_api_key(secret)
        found = None
        for key in self._keys:  # compare against every key in constant time per key
            if hmac.compare_digest(digest, key.sha256):
                found = key
        return found


class RateLimiter:
    """Token bucket per key: ``rate`` requests/s sustained, ``burst`` at once. Thread-safe.

    Keys may come from clients (addresses), so buckets that have refilled are forgotten once there are more
    than ``max_keys``: memory stays bounded by the keys active in the last ``burst / rate`` seconds."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()
        self._prune_at = max_keys

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - last) * self.rate)

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0 when allowed, else the seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            tokens = self._tokens(key, now)
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return max((cost - tokens) / self.rate, 0.001)

    def wait_s(self, key: str, cost: float = 1.0) -> float:
        """The seconds until ``cost`` tokens are there (0 when they are now), taking none."""
        if cost <= self.burst and key not in self._buckets:  # a full bucket: the common case, without the lock
            return 0.0
        with self._lock:
            return max((cost - self._tokens(key, time.monotonic())) / self.rate, 0.0)

    def _prune(self, now: float) -> None:
        self._buckets = {k: v for k, v in self._buckets.items() if self._tokens(k, now) < self.burst}
        # the next prune waits until as many keys again have arrived: O(1) amortized however many are active
        self._prune_at = max(self.max_keys, 2 * len(self._buckets))


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
