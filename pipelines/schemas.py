"""pandera schemas of the published datasets: every table is validated before a version is written."""

from __future__ import annotations

import pandera.pandas as pa

_SPLITS = ["train", "eval"]
_nonempty_ids = pa.Check(lambda s: s.map(lambda v: len(v) > 0), element_wise=False,
                         error="every row keeps the event_ids it came from")
_text = pa.Check.str_length(min_value=1)

PAIRS = pa.DataFrameSchema(
    {
        "pair_id": pa.Column(str, unique=True),
        "prompt": pa.Column(str, _text),
        "chosen": pa.Column(str, _text),
        "rejected": pa.Column(str, _text),
        "source": pa.Column(str, pa.Check.isin(["correction", "pairwise", "regenerate", "thumbs"])),
        "margin": pa.Column(float, [pa.Check.gt(0.5), pa.Check.le(1.0)]),
        "group_id": pa.Column(str),
        "split": pa.Column(str, pa.Check.isin(_SPLITS)),
        "event_ids": pa.Column(object, _nonempty_ids),
        "reviewed": pa.Column(bool),  # a reviewer accepted the feedback it came from
    },
    checks=[pa.Check(lambda df: df["chosen"] != df["rejected"], error="chosen and rejected must differ")],
    strict=True, ordered=True, name="pairs",
)

UNPAIRED = pa.DataFrameSchema(
    {
        "prompt": pa.Column(str, _text),
        "completion": pa.Column(str, _text),
        "label": pa.Column(bool),
        "source": pa.Column(str, pa.Check.isin(["thumbs", "correction"])),
        "group_id": pa.Column(str),
        "split": pa.Column(str, pa.Check.isin(_SPLITS)),
        "event_ids": pa.Column(object, _nonempty_ids),
    },
    strict=True, ordered=True, name="unpaired",
)

PROMPTS = pa.DataFrameSchema(
    {
        "prompt_id": pa.Column(str, unique=True),
        "prompt": pa.Column(str, _text),
        # the conversation as JSON messages ({"role", "content"}), PII masked: what training renders with the chat
        # template, as serving renders it; ``prompt`` is its flattened text (what reward models read)
        "messages": pa.Column(str, _text),
        "group_id": pa.Column(str),
        "split": pa.Column(str, pa.Check.isin(_SPLITS)),
        "n_turns": pa.Column(int, pa.Check.ge(1)),
    },
    strict=True, ordered=True, name="prompts",
)

QUARANTINE = pa.DataFrameSchema(
    {
        "event_id": pa.Column(str, unique=True),
        "reason": pa.Column(str),
        "type": pa.Column(str),
        "user_id": pa.Column(str),
        "occurred_at": pa.Column("datetime64[us, UTC]"),
    },
    strict=True, ordered=True, name="quarantine",
)
