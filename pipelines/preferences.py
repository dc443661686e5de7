"""Preference pairs, unpaired labels and prompts from curated feedback: the pairing rules, pure functions.

Each rule turns feedback into *votes* — one rater saying "for this prompt, text X is better than text Y" —
and :func:`aggregate_votes` merges votes on the same comparison (same prompt, same two texts) from several
raters into one pair whose ``margin`` is the winning side's share of the votes, counting their number:
:func:`vote_share`, the posterior mean under a uniform prior, ``(wins + 1) / (votes + 2)``. One vote is
2/3, not unanimity; three of three are 4/5; ten of ten 11/12. A reward model's margin loss reads
``2 * margin - 1`` (1/3, 3/5, 5/6 of its ``margin_scale``), so a pair's required gap grows with the evidence.

Pairing rules (``source``):

- ``correction``: the user's corrected text ≻ the response it corrects. The strongest signal: the user
  wrote what the answer should have been (abusive corrections were removed by the filters).
- ``pairwise``: the chosen response ≻ the other; ties give no pair (they are counted, then dropped).
- ``regenerate``: the new response ≻ the discarded one **only when the same user confirmed the new one**
  (thumbs up, or an implicit ``copy``/``continue`` on it). A regeneration alone says the first answer
  disappointed, not that the second is better (it may be just as bad), so it yields no pair by itself. A
  regeneration already judged by a pairwise event of the same user is left to that event (one judgement,
  one vote).
- ``thumbs``: for responses of the same model version to the same prompt (same normalised prompt text), a
  response rated up ≻ a response rated down (see :func:`thumbs_pairs`); at most ``max_thumb_pairs_per_prompt``
  text pairs per prompt and model version, by the strongest evidence. Thumbs come from different people on
  different responses, so they are aggregated per text, not per rater, and do not count towards rater
  agreement. Only within one model version: a thumb rates an answer against what its rater expects of the
  model that gave it, so an up on one model's answer and a down on another's do not rank the two (measured
  on the demo's simulated hour: 95 of the 288 thumbs pairs crossed from a fixed answer style to the serving
  model's answers, and 80% of those 95 ranked against the users' own preference; without them the reward
  model agreed with that preference on 0.797 of the eval pairs instead of 0.676).

Unpaired set (for KTO): thumbs up/down on a response (label True/False); a correction gives its corrected
text (True) and the corrected response (False). Implicit signals are too weak to be labels and are not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ingest.text import stable_hash


def vote_share(wins: np.ndarray | float, votes: np.ndarray | float) -> np.ndarray | float:
    """The winning side's share of the votes, with the number of votes counted: the mean of the Beta posterior
    under a uniform prior (Laplace's rule of succession), ``(wins + 1) / (votes + 2)``."""
    return (wins + 1.0) / (votes + 2.0)


VOTE_COLUMNS = ["prompt_key", "prompt", "x_key", "x", "y_key", "y", "source", "rater", "event_ids"]
"""One vote: ``x`` ≻ ``y`` for ``prompt`` by ``rater``."""


@dataclass(frozen=True)
class PairingConfig:
    max_thumb_pairs_per_prompt: int = 6


def _votes(df: pd.DataFrame, source: str) -> pd.DataFrame:
    if df.empty:
        return pd.DataFrame(columns=VOTE_COLUMNS)
    out = df.assign(source=source)
    return out[VOTE_COLUMNS].reset_index(drop=True)


def _turn_cols(turns: pd.DataFrame, suffix: str) -> pd.DataFrame:
    t = turns[["response_id", "event_id", "prompt_key", "prompt", "response_key", "response"]]
    return t.rename(columns={c: f"{c}{suffix}" for c in t.columns})


def correction_votes(fb: pd.DataFrame, turns: pd.DataFrame) -> pd.DataFrame:
    c = fb[fb["type"] == "correction"].merge(_turn_cols(turns, "_t"), left_on="response_id",
                                              right_on="response_id_t", how="inner")
    c = c[c["corrected_text"].str.strip() != c["response_t"].str.strip()]
    return _votes(pd.DataFrame({
        "prompt_key": c["prompt_key_t"], "prompt": c["prompt_t"],
        "x_key": c["corrected_text"].map(stable_hash), "x": c["corrected_text"],
        "y_key": c["response_key_t"], "y": c["response_t"], "rater": c["user_id"],
        "event_ids": [[a, b] for a, b in zip(c["event_id"].tolist(), c["event_id_t"].tolist(), strict=True)],
    }), "correction")


def pairwise_votes(fb: pd.DataFrame, turns: pd.DataFrame) -> pd.DataFrame:
    p = fb[(fb["type"] == "pairwise") & (fb["value"] != "tie")]
    p = p.merge(_turn_cols(turns, "_a"), left_on="response_id", right_on="response_id_a", how="inner")
    p = p.merge(_turn_cols(turns, "_b"), left_on="other_response_id", right_on="response_id_b", how="inner")
    p = p[p["response_key_a"] != p["response_key_b"]]
    a_wins = p["value"] == "a"

    def pick(col: str) -> pd.Series:
        return p[f"{col}_a"].where(a_wins, p[f"{col}_b"])

    def other(col: str) -> pd.Series:
        return p[f"{col}_b"].where(a_wins, p[f"{col}_a"])

    return _votes(pd.DataFrame({
        "prompt_key": p["prompt_key_a"], "prompt": p["prompt_a"],
        "x_key": pick("response_key"), "x": pick("response"),
        "y_key": other("response_key"), "y": other("response"), "rater": p["user_id"],
        "event_ids": [[e, a, b] for e, a, b in zip(p["event_id"].tolist(), p["event_id_a"].tolist(), p["event_id_b"].tolist(), strict=True)],
    }), "pairwise")


def regenerate_votes(fb: pd.DataFrame, turns: pd.DataFrame) -> pd.DataFrame:
    regen = fb[fb["type"] == "regenerate"][["event_id", "user_id", "response_id", "other_response_id"]]
    confirm = fb[((fb["type"] == "thumbs") & (fb["value"] == "up"))
                 | ((fb["type"] == "implicit") & fb["value"].isin(["copy", "continue"]))]
    confirm = confirm[["event_id", "user_id", "response_id"]].drop_duplicates(["user_id", "response_id"])
    r = regen.merge(confirm, left_on=["user_id", "other_response_id"], right_on=["user_id", "response_id"],
                    how="inner", suffixes=("", "_ok"))
    judged = fb[fb["type"] == "pairwise"]
    judged_keys = set(zip(judged["user_id"], judged["response_id"], judged["other_response_id"], strict=True))
    judged_keys |= {(u, b, a) for u, a, b in judged_keys}
    unjudged = np.array([(u, a, b) not in judged_keys for u, a, b in
                         zip(r["user_id"], r["response_id"], r["other_response_id"], strict=True)], dtype=bool)
    r = r[unjudged]
    r = r.merge(_turn_cols(turns, "_old"), left_on="response_id", right_on="response_id_old", how="inner")
    r = r.merge(_turn_cols(turns, "_new"), left_on="other_response_id", right_on="response_id_new", how="inner")
    r = r[r["response_key_old"] != r["response_key_new"]]
    return _votes(pd.DataFrame({
        "prompt_key": r["prompt_key_new"], "prompt": r["prompt_new"],
        "x_key": r["response_key_new"], "x": r["response_new"],
        "y_key": r["response_key_old"], "y": r["response_old"], "rater": r["user_id"],
        "event_ids": [[a, b, c, d] for a, b, c, d in zip(r["event_id"], r["event_id_ok"], r["event_id_old"],
                                                          r["event_id_new"], strict=True)],
    }), "regenerate")


def thumbs_pairs(fb: pd.DataFrame, turns: pd.DataFrame, cfg: PairingConfig) -> pd.DataFrame:
    """Up-rated ≻ down-rated responses to the same prompt, already aggregated.

    For texts X and Y of one prompt, the evidence for X ≻ Y is the ups on X and the downs on Y, against it
    the downs on X and the ups on Y; ``margin`` is the :func:`vote_share` of the evidence. A pair needs at least
    one up on the winner and one down on the loser, a strictly higher up-share, and more evidence for than
    against.
    """
    cols = ["prompt_key", "prompt", "chosen", "rejected", "source", "margin", "n_votes", "event_ids"]
    th = fb[fb["type"] == "thumbs"][["event_id", "response_id", "value"]].merge(
        # prepare_turns always gives model_version; "" keeps a missing one in groupby (which drops NaN keys)
        _turn_cols(turns, "_t").assign(model_t=turns["model_version"].fillna("").to_numpy()),
        left_on="response_id", right_on="response_id_t", how="inner")
    if th.empty:
        return pd.DataFrame(columns=cols)
    th = th.sort_values("event_id", kind="stable")
    th = th.assign(up=(th["value"] == "up").astype(int), down=(th["value"] == "down").astype(int))
    group = ["prompt_key_t", "model_t"]  # thumbs rank answers of one model version against each other only
    per_text = (th.groupby([*group, "response_key_t"], sort=True)
                .agg(prompt=("prompt_t", "first"), response=("response_t", "first"),
                     ups=("up", "sum"), downs=("down", "sum"), event_ids=("event_id", list))
                .reset_index())
    per_text = per_text[per_text.groupby(group)["response_key_t"].transform("size") > 1]
    # every ordered pair of texts of one group at once (a self-join on the group), then the rules as columns
    x = per_text.reset_index(drop=True)
    pairs = x.merge(x, on=group, suffixes=("_x", "_y"))
    pairs = pairs[(pairs["response_key_t_x"] != pairs["response_key_t_y"]) & (pairs["ups_x"] > 0)
                  & (pairs["downs_y"] > 0)]
    share_x = pairs["ups_x"] / (pairs["ups_x"] + pairs["downs_x"])
    share_y = pairs["ups_y"] / (pairs["ups_y"] + pairs["downs_y"])
    support, against = pairs["ups_x"] + pairs["downs_y"], pairs["downs_x"] + pairs["ups_y"]
    pairs = pairs.assign(support=support, against=against, strength=against - support)
    pairs = pairs[(share_x > share_y) & (pairs["support"] > pairs["against"])]
    # the strongest evidence first, then by text key: at most max_thumb_pairs_per_prompt pairs a group
    pairs = pairs.sort_values([*group, "strength", "response_key_t_x", "response_key_t_y"], kind="stable")
    pairs = pairs.groupby(group, sort=False).head(cfg.max_thumb_pairs_per_prompt)
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    n = (pairs["support"] + pairs["against"]).to_numpy()
    return pd.DataFrame({
        "prompt_key": pairs["prompt_key_t"].to_numpy(), "prompt": pairs["prompt_x"].to_numpy(),
        "chosen": pairs["response_x"].to_numpy(), "rejected": pairs["response_y"].to_numpy(), "source": "thumbs",
        "margin": vote_share(pairs["support"].to_numpy(), n), "n_votes": n,
        "event_ids": [sorted(a + b) for a, b in zip(pairs["event_ids_x"].tolist(), pairs["event_ids_y"].tolist(), strict=True)],
    }, columns=cols)


def build_votes(fb: pd.DataFrame, turns: pd.DataFrame) -> pd.DataFrame:
    """Votes of the rater-level rules (correction, pairwise, regenerate)."""
    parts = [correction_votes(fb, turns), pairwise_votes(fb, turns), regenerate_votes(fb, turns)]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=VOTE_COLUMNS)


def aggregate_votes(votes: pd.DataFrame) -> tuple[pd.DataFrame, list[list[str]], int]:
    """Merge votes on the same (source, prompt, unordered text pair).

    Returns the pairs ``[prompt_key, prompt, chosen, rejected, source, margin, n_votes, event_ids]``, the per-item
    rater values (for agreement), and the number of comparisons dropped because the raters split evenly.
    """
    if votes.empty:
        cols = ["prompt_key", "prompt", "chosen", "rejected", "source", "margin", "n_votes", "event_ids"]
        return pd.DataFrame(columns=cols), [], 0
    v = votes.copy()
    first_is_x = v["x_key"] <= v["y_key"]
    v["k1"] = np.where(first_is_x, v["x_key"], v["y_key"])
    v["k2"] = np.where(first_is_x, v["y_key"], v["x_key"])
    v["w1"] = first_is_x.astype(int)
    keys = ["source", "prompt_key", "k1", "k2"]
    # one vote per rater: a rater's latest opinion on an item (filters already removed flip-floppers)
    v = v.drop_duplicates([*keys, "rater"], keep="last")
    counts = v.groupby(keys, sort=True).agg(n=("w1", "size"), n1=("w1", "sum")).reset_index()
    items = [["1"] * n1 + ["2"] * (n - n1) for n, n1 in zip(counts["n"], counts["n1"], strict=True)]
    ties = int((2 * counts["n1"] == counts["n"]).sum())
    counts = counts[2 * counts["n1"] != counts["n"]]
    counts["w1_wins"] = (2 * counts["n1"] > counts["n"]).astype(int)
    winners = v.merge(counts[[*keys, "w1_wins", "n", "n1"]], on=keys, how="inner")
    winners = winners[winners["w1"] == winners["w1_wins"]].drop_duplicates(keys, keep="first")
    ids = (v.explode("event_ids").drop_duplicates([*keys, "event_ids"])
           .sort_values([*keys, "event_ids"], kind="stable").groupby(keys, sort=True)["event_ids"].agg(list))
    winners = winners.merge(ids.rename("all_ids").reset_index(), on=keys, how="left").sort_values(keys, kind="stable")
    n, n1 = winners["n"].to_numpy(), winners["n1"].to_numpy()
    pairs = pd.DataFrame({"prompt_key": winners["prompt_key"].to_numpy(), "prompt": winners["prompt"].to_numpy(),
                          "chosen": winners["x"].to_numpy(), "rejected": winners["y"].to_numpy(),
                          "source": winners["source"].to_numpy(), "margin": vote_share(np.maximum(n1, n - n1), n),
                          "n_votes": n, "event_ids": winners["all_ids"].to_numpy()})
    return pairs, items, ties


def unpaired_labels(fb: pd.DataFrame, turns: pd.DataFrame) -> pd.DataFrame:
    """(prompt, completion, label) rows for KTO, one per thumbs event and two per correction."""
    t = _turn_cols(turns, "_t")
    th = fb[fb["type"] == "thumbs"].merge(t, left_on="response_id", right_on="response_id_t", how="inner")
    co = fb[fb["type"] == "correction"].merge(t, left_on="response_id", right_on="response_id_t", how="inner")
    parts = [
        pd.DataFrame({"prompt_key": th["prompt_key_t"], "prompt": th["prompt_t"], "completion": th["response_t"],
                      "label": th["value"] == "up", "source": "thumbs",
                      "event_ids": [[a, b] for a, b in zip(th["event_id"].tolist(), th["event_id_t"].tolist(), strict=True)]}),
        pd.DataFrame({"prompt_key": co["prompt_key_t"], "prompt": co["prompt_t"], "completion": co["corrected_text"],
                      "label": True, "source": "correction",
                      "event_ids": [[a, b] for a, b in zip(co["event_id"].tolist(), co["event_id_t"].tolist(), strict=True)]}),
        pd.DataFrame({"prompt_key": co["prompt_key_t"], "prompt": co["prompt_t"], "completion": co["response_t"],
                      "label": False, "source": "correction",
                      "event_ids": [[a, b] for a, b in zip(co["event_id"].tolist(), co["event_id_t"].tolist(), strict=True)]}),
    ]
    out = pd.concat([p for p in parts if not p.empty], ignore_index=True) if any(not p.empty for p in parts) else \
        pd.DataFrame(columns=["prompt_key", "prompt", "completion", "label", "source", "event_ids"])
    return out
