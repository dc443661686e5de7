"""Bearer API keys (stored hashed) and a per-key token-bucket rate limit."""

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
    """Token bucket per key: ``rate`` requests/s sustained, ``burst`` at once. Thread-safe."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def acquire(self, key: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens; returns 0 when allowed, else the seconds to wait before retrying."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return max((cost - tokens) / self.rate, 0.001)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
