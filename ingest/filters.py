"""Abuse and quality filters for feedback: pure functions from tables to held-back events with a reason.

Every filter takes the interval's feedback table (one row per feedback event, see ``FEEDBACK_COLUMNS``) and,
where it needs them, the turns table (``response_id, prompt, response, occurred_at``), and returns a
DataFrame ``[event_id, reason]`` of the events it holds back. Nothing is deleted: curation writes these rows
to the quarantine table so a reviewer can audit every decision. :func:`apply_filters` runs them in the order
below; an event held back by several filters keeps the first reason.

The per-event filters (``STREAM_REASONS``: a blocked account, a correction that matches the content rules
or has too few words) also run in the consumer path, through :class:`StreamScreen`: the consumer writes
those events to the lake's quarantine area (``quarantine/reason=<reason>/...``, whole events, same
exactly-once rules) instead of the event tables, and curation adds them to the quarantine table of the
interval. The rest needs history or the response text and runs in batch curation.

===================  ===================================================================================
reason               rule (thresholds in ``FilterConfig``)
===================  ===================================================================================
blocked_account      the user is on the blocked list (settings or a file)
burst_rate           the user sent more than ``max_per_minute`` feedback events in some 60 s window
too_fast             feedback arrived sooner after the turn than a person could read the response
                     (``min_read_s + chars / read_chars_per_s``)
vote_flip            the same user gave opposite thumbs (or pairwise choices) on the same response(s)
contradiction        the same user gave opposite thumbs to identical prompt + response texts
brigading            near-identical correction text from ``brigade_min_accounts`` or more accounts, on at
                     least two different prompts, within ``brigade_window``
harmful_correction   the correction matches the content rules (prompt injection, credential or payment
                     phishing, scams, violence, hate, manipulation, links absent from the response)
empty_correction     fewer than ``min_correction_words`` words
oversized_correction longer than ``max(oversize_ratio * response, oversize_floor_chars)``
unrelated_correction shares almost no words with the response it corrects (Jaccard < ``min_overlap``)
===================  ===================================================================================
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flywheel.events import AnyEvent
from flywheel.settings import CurationSettings
from ingest.text import has_words, jaccard, near_duplicate_groups, words

FEEDBACK_COLUMNS = ["event_id", "type", "user_id", "occurred_at", "response_id", "other_response_id", "value",
                    "corrected_text"]
"""The unified feedback table: ``response_id`` is the response the event is about (for ``regenerate`` the
discarded one, for ``pairwise`` response A), ``other_response_id`` the second response (regenerate: the new
one, pairwise: B), ``value`` the label (thumbs up/down, pairwise a/b/tie, implicit action)."""

REASONS = ["blocked_account", "burst_rate", "too_fast", "vote_flip", "contradiction", "brigading",
           "harmful_correction", "empty_correction", "oversized_correction", "unrelated_correction"]


@dataclass(frozen=True)
class FilterConfig:
    blocked_users: frozenset[str] = frozenset()
    max_per_minute: int = 20
    min_read_s: float = 1.0
    read_chars_per_s: float = 250.0  # a very fast skim; people read 15-40 characters per second
    brigade_min_accounts: int = 4
    brigade_window: timedelta = timedelta(hours=6)
    min_correction_words: int = 2
    oversize_ratio: float = 4.0
    oversize_floor_chars: int = 2_000
    min_overlap: float = 0.08

    @classmethod
    def from_settings(cls, c: CurationSettings, *, blocklist_file: bool = True) -> FilterConfig:
        """The thresholds from ``settings.curation``; the block list is the settings' plus the file's."""
        return cls.with_blocklist_file(
            c.blocklist_file if blocklist_file else None, blocked_users=frozenset(c.blocked_users),
            max_per_minute=c.max_feedback_per_minute, min_read_s=c.min_read_s, read_chars_per_s=c.read_chars_per_s,
            brigade_min_accounts=c.brigade_min_accounts, brigade_window=timedelta(hours=c.brigade_window_h),
            min_overlap=c.min_correction_overlap)

    @classmethod
    def with_blocklist_file(cls, path: str | Path | None, **kwargs: object) -> FilterConfig:
        blocked = set(kwargs.pop("blocked_users", ()) or ())  # type: ignore[call-overload]
        if path:
            blocked |= {ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")}
        return cls(blocked_users=frozenset(blocked), **kwargs)  # type: ignore[arg-type]


def _held(event_ids: Iterable[str], reason: str) -> pd.DataFrame:
    ids = pd.Series(list(event_ids), dtype="string")
    return pd.DataFrame({"event_id": ids, "reason": pd.Series([reason] * len(ids), dtype="string")})


# ------------------------------------------------------------------------------------------- accounts
def blocked_accounts(fb: pd.DataFrame, blocked: frozenset[str]) -> pd.DataFrame:
    return _held(fb.loc[fb["user_id"].isin(blocked), "event_id"], "blocked_account")


def burst_rate(fb: pd.DataFrame, max_per_minute: int) -> pd.DataFrame:
    """Users whose feedback ever exceeds ``max_per_minute`` in a sliding 60 s window: all their feedback."""
    if fb.empty:
        return _held([], "burst_rate")
    df = fb[["user_id", "occurred_at"]].sort_values(["user_id", "occurred_at"], kind="stable")
    t = df["occurred_at"].astype("datetime64[us, UTC]").astype("int64").to_numpy()  # microseconds
    users = df["user_id"].to_numpy()
    starts = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1]
    ends = np.r_[starts[1:], len(users)]
    bad: set[str] = set()
    for s, e in zip(starts, ends, strict=True):
        if e - s <= max_per_minute:
            continue
        ts = t[s:e]
        first_in_window = np.searchsorted(ts, ts - 60_000_000 + 1, side="left")
        if ((np.arange(len(ts)) - first_in_window + 1) > max_per_minute).any():
            bad.add(users[s])
    return _held(fb.loc[fb["user_id"].isin(bad), "event_id"], "burst_rate")


# --------------------------------------------------------------------------------------------- timing
def too_fast(fb: pd.DataFrame, turns: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """Thumbs, corrections and pairwise choices sent before the response could have been read."""
    rated = fb[fb["type"].isin(["thumbs", "correction", "pairwise"])]
    j = rated.merge(turns[["response_id", "occurred_at", "response"]], on="response_id", how="inner",
                    suffixes=("", "_turn"))
    delay = (j["occurred_at"] - j["occurred_at_turn"]).dt.total_seconds()
    needed = cfg.min_read_s + j["response"].str.len() / cfg.read_chars_per_s
    return _held(j.loc[delay < needed, "event_id"], "too_fast")


# ----------------------------------------------------------------------------------------- consistency
def vote_flip(fb: pd.DataFrame) -> pd.DataFrame:
    """Opposite labels from one user on the same response (thumbs) or the same pair (pairwise choices)."""
    thumbs = fb[fb["type"] == "thumbs"]
    n = thumbs.groupby(["user_id", "response_id"])["value"].transform("nunique")
    flipped = thumbs.loc[n > 1, "event_id"]
    pw = fb[(fb["type"] == "pairwise") & (fb["value"] != "tie")].copy()
    lo = pw[["response_id", "other_response_id"]].min(axis=1)
    hi = pw[["response_id", "other_response_id"]].max(axis=1)
    # the chosen response's id, so "a" on (x, y) and "b" on (y, x) agree
    pw["chosen"] = np.where(pw["value"] == "a", pw["response_id"], pw["other_response_id"])
    pw["lo"], pw["hi"] = lo, hi
    m = pw.groupby(["user_id", "lo", "hi"])["chosen"].transform("nunique")
    return _held(list(flipped) + list(pw.loc[m > 1, "event_id"]), "vote_flip")


def contradiction(fb: pd.DataFrame, turns: pd.DataFrame) -> pd.DataFrame:
    """One user, identical prompt and response texts (different response ids), opposite thumbs."""
    thumbs = fb[fb["type"] == "thumbs"].merge(turns[["response_id", "prompt_key", "response_key"]],
                                              on="response_id", how="inner")
    if thumbs.empty:
        return _held([], "contradiction")
    n = thumbs.groupby(["user_id", "prompt_key", "response_key"])["value"].transform("nunique")
    same_response = thumbs.groupby(["user_id", "response_id"])["value"].transform("nunique") > 1
    return _held(thumbs.loc[(n > 1) & ~same_response, "event_id"], "contradiction")


# ---------------------------------------------------------------------------------------- corrections
def brigading(fb: pd.DataFrame, turns: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """Near-identical correction texts from many accounts, on different prompts, within a window.

    Honest users who correct the *same* answer to the same prompt often converge on the same text; a brigade
    pushes one text onto whatever response it finds, so a group must span at least two prompts."""
    corr = fb[fb["type"] == "correction"].sort_values(["occurred_at", "event_id"], kind="stable")
    if corr.empty:
        return _held([], "brigading")
    texts = corr["corrected_text"].tolist()
    groups = near_duplicate_groups(texts)
    prompt_of = dict(zip(turns["response_id"].tolist(), turns["prompt_key"].tolist(), strict=True))
    corr = corr.assign(group=groups, prompt_key=corr["response_id"].map(prompt_of).fillna(corr["response_id"]))
    sizes = corr.groupby("group")["user_id"].transform("nunique")
    spread = corr.groupby("group")["prompt_key"].transform("nunique")
    candidates = corr[(sizes >= cfg.brigade_min_accounts) & (spread >= 2)]
    held: list[str] = []
    window = np.timedelta64(int(cfg.brigade_window.total_seconds() * 1e6), "us")
    for _, g in candidates.groupby("group"):
        times = g["occurred_at"].to_numpy()
        users = g["user_id"].tolist()
        in_window: Counter[str] = Counter()  # accounts in times[lo..hi], kept incrementally
        lo = 0
        in_brigade = np.zeros(len(g), dtype=bool)
        for hi in range(len(g)):
            in_window[users[hi]] += 1
            while times[hi] - times[lo] > window:
                in_window[users[lo]] -= 1
                if not in_window[users[lo]]:
                    del in_window[users[lo]]
                lo += 1
            if len(in_window) >= cfg.brigade_min_accounts:
                in_brigade[lo:hi + 1] = True
        held.extend(g["event_id"].to_numpy()[in_brigade])
    return _held(held, "brigading")


_HARM_RULES: dict[str, re.Pattern[str]] = {
    "prompt_injection": re.compile(r"\b(ignore|disregard|forget)\b.{0,30}\b(previous|prior|above|all|your)\b.{0,20}"
                                   r"\b(instructions?|rules|guidelines|prompt)\b"),
    "credentials": re.compile(r"\b(send|give|share|enter|confirm|verify)\b.{0,40}\b(password|passcode|pin|ssn|"
                              r"social security|card number|cvv|bank (details|account)|seed phrase|login)\b"),
    "scam": re.compile(r"\b(guaranteed (returns?|profit|income)|double your (money|crypto|bitcoin)|"
                       r"wire (the )?money|gift cards?|act now|limited time offer|buy \w+ now|crypto ?coin)\b"),
    "violence": re.compile(r"\b(how to (make|build) (a )?(bomb|explosive|weapon)|kill (yourself|them|him|her)|"
                           r"poison (someone|him|her|them)|hurt (yourself|others))\b"),
    "hate": re.compile(r"\b(subhuman|vermin|inferior race|go back to your country|exterminate)\b"),
    "manipulation": re.compile(r"\b(always (recommend|say|tell|praise)|never (mention|admit|tell|warn)|"
                               r"tell (the )?users? (to|that)|you must obey|do not tell anyone)\b"),
}
_LINK = re.compile(r"https?://[^\s)]+|\bwww\.[^\s)]+|\b[a-z0-9-]+\.(xyz|top|click|ru|biz)\b")


_ANY_HARM = re.compile("|".join(f"(?:{rx.pattern})" for rx in _HARM_RULES.values()))
# The same rules for Arrow's regex engine (RE2), over a whole column at once, as a pre-filter that matches at least
# what they match: the word boundaries dropped (an assertion fewer only matches more), ``\w`` widened to ``\S``
# (a word character is never whitespace), and case ignored by the engine instead of ``str.lower`` (whose only
# expansion, İ -> i + a combining dot, can only lengthen a text). Rows it matches get the exact rules.
_MAYBE_HARM = _ANY_HARM.pattern.replace(r"\b", "").replace(r"\w", r"\S")


def _rule_hits(low: str) -> list[str]:
    """The content rules a lower-cased text matches."""
    return [name for name, rx in _HARM_RULES.items() if rx.search(low)] if _ANY_HARM.search(low) else []


def harmful_categories(text: str, response: str = "") -> list[str]:
    """The content-rule categories a correction matches (empty = looks harmless)."""
    low = text.lower()
    hits = _rule_hits(low)
    links = {m.group(0) for m in _LINK.finditer(low)}
    if any(link not in response.lower() for link in links):
        hits.append("new_link")
    return hits


def correction_checks(fb: pd.DataFrame, turns: pd.DataFrame, cfg: FilterConfig) -> pd.DataFrame:
    """Harmful, empty, oversized or unrelated corrections (in that order of precedence)."""
    corr = fb[fb["type"] == "correction"].merge(turns[["response_id", "response"]], on="response_id", how="left")
    out: list[tuple[str, str]] = []
    response_words: dict[str, set[str]] = {}  # many corrections of the same answer
    for eid, text, response in zip(corr["event_id"], corr["corrected_text"], corr["response"].fillna(""), strict=True):
        text = text or ""
        text_words = words(text)
        if harmful_categories(text, response):
            out.append((eid, "harmful_correction"))
        elif len(text_words) < cfg.min_correction_words:
            out.append((eid, "empty_correction"))
        elif len(text) > max(cfg.oversize_ratio * len(response), cfg.oversize_floor_chars):
            out.append((eid, "oversized_correction"))
        elif response and jaccard(text_words, response_words.get(response) or
                                  response_words.setdefault(response, set(words(response)))) < cfg.min_overlap:
            out.append((eid, "unrelated_correction"))
    return pd.DataFrame(out, columns=["event_id", "reason"]).astype("string")


# --------------------------------------------------------------------------------------- consumer path
STREAM_REASONS = ("blocked_account", "harmful_correction", "empty_correction")


def screen_event(event_type: str, user_id: str, corrected_text: str | None, cfg: FilterConfig) -> str | None:
    """The per-event filters, on one feedback event: the reason it is held back, or ``None``.

    The same rules as the batch filters, in the same order, minus what needs the corrected response (the
    link rule and the size/overlap checks run in curation)."""
    if event_type in ("turn", "review"):  # a review is a reviewer's decision, not the user's feedback
        return None
    if user_id in cfg.blocked_users:
        return "blocked_account"
    if event_type == "correction":
        text = corrected_text or ""
        if _rule_hits(text.lower()):  # the rules of harmful_categories but the link rule, which needs the response
            return "harmful_correction"
        if not has_words(text, cfg.min_correction_words):
            return "empty_correction"
    return None


class StreamScreen:
    """:func:`screen_event` for the consumer, with the block list file re-read when it changes (checked at
    most every ``reload_s`` seconds), so blocking an account needs no restart."""

    def __init__(self, cfg: FilterConfig, blocklist_file: str | Path | None = None, *, reload_s: float = 10.0):
        self._base, self._file, self._reload_s = cfg, Path(blocklist_file) if blocklist_file else None, reload_s
        self.cfg, self._checked = cfg, float("-inf")
        self._mtime: int | None = None
        self._maybe_reload()

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if self._file is None or now - self._checked < self._reload_s:
            return
        self._checked = now
        try:
            mtime = self._file.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._mtime = mtime
            from_file = FilterConfig.with_blocklist_file(self._file if mtime is not None else None)
            self.cfg = replace(self._base, blocked_users=self._base.blocked_users | from_file.blocked_users)

    def __call__(self, event: AnyEvent) -> str | None:
        self._maybe_reload()
        text = event.corrected_text if event.type == "correction" else None
        return screen_event(event.type, event.user_id, text, self.cfg)

    def screen_rows(self, event_type: str, user_ids: list[str], corrected_texts: list[str] | None) -> list[str | None]:
        """:func:`screen_event` for many events of one type (the consumer's column-wise path)."""
        self._maybe_reload()
        cfg = self.cfg
        if event_type in ("turn", "review") or (event_type != "correction" and not cfg.blocked_users):
            return [None] * len(user_ids)
        if event_type != "correction" or corrected_texts is None:
            return [screen_event(event_type, u, None, cfg) for u in user_ids]
        maybe = pc.fill_null(pc.match_substring_regex(pa.array(corrected_texts, pa.string()), _MAYBE_HARM,
                                                      ignore_case=True), False).to_numpy(zero_copy_only=False)
        out: list[str | None] = []
        for user, text, suspect in zip(user_ids, corrected_texts, maybe, strict=True):
            if user in cfg.blocked_users:
                out.append("blocked_account")
            elif suspect and _rule_hits((text or "").lower()):
                out.append("harmful_correction")
            elif not has_words(text or "", cfg.min_correction_words):
                out.append("empty_correction")
            else:
                out.append(None)
        return out


# ------------------------------------------------------------------------------------------------ all
@dataclass
class FilterResult:
    kept: pd.DataFrame
    quarantine: pd.DataFrame  # event_id, reason, type, user_id, occurred_at
    held_by_reason: dict[str, int] = field(default_factory=dict)


def apply_filters(fb: pd.DataFrame, turns: pd.DataFrame, cfg: FilterConfig) -> FilterResult:
    """Run every filter; each held-back event keeps the first reason in ``REASONS`` order."""
    verdicts = pd.concat([
        blocked_accounts(fb, cfg.blocked_users),
        burst_rate(fb, cfg.max_per_minute),
        too_fast(fb, turns, cfg),
        vote_flip(fb),
        contradiction(fb, turns),
        brigading(fb, turns, cfg),
        correction_checks(fb, turns, cfg),
    ], ignore_index=True)
    verdicts["rank"] = verdicts["reason"].map({r: i for i, r in enumerate(REASONS)})
    verdicts = verdicts.sort_values(["event_id", "rank"], kind="stable").drop_duplicates("event_id")
    held = fb.merge(verdicts[["event_id", "reason"]], on="event_id", how="inner")
    quarantine = held[["event_id", "reason", "type", "user_id", "occurred_at"]].sort_values(
        ["occurred_at", "event_id"], kind="stable").reset_index(drop=True)
    kept = fb[~fb["event_id"].isin(verdicts["event_id"])].reset_index(drop=True)
    counts = quarantine["reason"].value_counts()
    return FilterResult(kept, quarantine, {r: int(counts.get(r, 0)) for r in REASONS})
