"""Text helpers shared by the filters and curation: normalisation, near-duplicate grouping, PII masking.

Near duplicates use MinHash over word 3-shingles with LSH banding (8 hashes in 4 bands of 2, so texts with
Jaccard similarity around 0.5 or more very likely share a band): texts that share any band are joined into
one group by union-find. Everything is deterministic (hashes are seeded, never Python's ``hash``).
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

_NON_WORD = re.compile(r"[^a-z0-9]+")
_PRIME = np.uint64((1 << 61) - 1)
_N_HASHES, _BANDS = 8, 4
_rng = np.random.default_rng(20261122)
_A = _rng.integers(1, (1 << 31) - 1, size=_N_HASHES, dtype=np.uint64)
_B = _rng.integers(0, (1 << 31) - 1, size=_N_HASHES, dtype=np.uint64)


def normalize(text: str) -> str:
    """Lower-case words and digits only, single-spaced: what "the same text" means for grouping."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def words(text: str) -> list[str]:
    return normalize(text).split()


_WORD = re.compile(r"[a-z0-9]+")


def has_words(text: str, n: int) -> bool:
    """``len(words(text)) >= n``, reading only as far as the n-th word."""
    found = _WORD.finditer(text.lower())
    return all(next(found, None) is not None for _ in range(n))


def stable_hash(text: str) -> str:
    """A short content hash that is the same on every machine and run."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    sa, sb = set(a), set(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _signature(text: str) -> tuple[int, ...]:
    toks = words(text)
    shingles = {" ".join(toks[i:i + 3]) for i in range(max(1, len(toks) - 2))} or {""}
    h = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
    mins = ((h[:, None] * _A[None, :] + _B[None, :]) % _PRIME).min(axis=0)
    return tuple(int(x) for x in mins)


def near_duplicate_groups(texts: Sequence[str]) -> list[int]:
    """For each text, the index of the first text of its near-duplicate group (exact duplicates included)."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first_exact: dict[str, int] = {}
    buckets: dict[tuple[int, tuple[int, ...]], int] = {}
    per_band = _N_HASHES // _BANDS
    for i, text in enumerate(texts):
        norm = normalize(text)
        if norm in first_exact:  # exact duplicates skip the MinHash work
            union(first_exact[norm], i)
            continue
        first_exact[norm] = i
        sig = _signature(norm)
        for band in range(_BANDS):
            key = (band, sig[band * per_band:(band + 1) * per_band])
            if key in buckets:
                union(buckets[key], i)
            else:
                buckets[key] = i
    return [find(i) for i in range(len(texts))]


# ---------------------------------------------------------------------------------------------- PII
_MAYBE_PII = re.compile(r"[\d@]")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w+])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b")


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace emails, card-like numbers (Luhn-valid, 13-19 digits) and phone numbers with placeholders."""
    counts = {"email": 0, "card": 0, "phone": 0}
    if not text or not _MAYBE_PII.search(text):
        return text, counts

    def email(_m: re.Match[str]) -> str:
        counts["email"] += 1
        return "<EMAIL>"

    def card(m: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 19 and _luhn_ok(digits):
            counts["card"] += 1
            return "<CARD>"
        return m.group(0)

    def phone(m: re.Match[str]) -> str:
        if len(re.sub(r"\D", "", m.group(0))) < 9:
            return m.group(0)
        counts["phone"] += 1
        return "<PHONE>"

    text = _EMAIL.sub(email, text)
    text = _CARD.sub(card, text)
    text = _PHONE.sub(phone, text)
    return text, counts
