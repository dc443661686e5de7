"""The policy that answers ``POST /v1/chat``, and the version string stamped on every turn it produces.

Models are loaded, prompts rendered and answers sampled by :mod:`training.generation`, the layer training and
the gate use too, with the same sampling configuration (``SAMPLING``). Generation is serialised by a lock: one model, one forward at a time.
A caller that passes ``between`` to :meth:`PolicyHandle.generate` (the API's generation pool) gets control back
between two forward passes, so it can answer shorter chats in the middle of a long one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel import progress
from training.generation import SAMPLING, load_causal_lm, render_prompt, sample, shortest_first

log = logging.getLogger(__name__)

def policy_version_label(model: str, version: str) -> str:
    """What a turn's ``model_version`` says for a registered version: ``flywheel-policy/3``."""
    return f"{model}/{version}"


def _keeping_rng(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with the torch RNG state put back afterwards (a chat run in between may seed it)."""
    import torch

    def call() -> None:
        state = torch.get_rng_state()
        try:
            fn()
        finally:
            torch.set_rng_state(state)

    return call


def _after_every_token(fn: Callable[[], None]) -> Any:
    """``stopping_criteria`` for ``generate`` that call ``fn`` after each new token and never stop anything."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Between(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            fn()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Between()])


@dataclass
class Reply:
    text: str
    model_version: str
    finished: bool  # False when generation stopped at max_new_tokens


class PolicyHandle:
    def __init__(self, model: Any, tokenizer: Any, version: str, *, temperature: float = SAMPLING.temperature,
                 top_p: float = SAMPLING.top_p,
                 prefill_chunk: int = 256):
        self.model, self.tokenizer, self.version = model, tokenizer, version
        self.temperature, self.top_p = temperature, top_p
        # With ``between``, a prompt is read this many tokens per forward pass: the longest a chat arriving during
        # a long prefill waits for the model (SmolLM2 on one core: ~1 s a chunk, ~9 s for 2048 tokens at once).
        self.prefill_chunk = prefill_chunk
        self._lock = threading.RLock()  # re-entrant: a shorter chat runs inside a longer one's ``between``

    @classmethod
    def load(cls, model: str, version: str) -> PolicyHandle:
        lm, tok = load_causal_lm(model)
        return cls(lm, tok, version)

    def prompt_ids(self, messages: list[dict[str, str]]) -> Any:
        """The token ids the model reads for ``messages``: the chat template rendered by the generation layer,
        as training renders the same conversation."""
        return self.tokenizer(render_prompt(self.tokenizer, messages), return_tensors="pt",
                              add_special_tokens=False)["input_ids"]

    def pick(self) -> PolicyHandle:
        """The handle that answers the next chat: this one (a :class:`~serving.champion.ChampionPolicy` picks
        between its champion and challenger)."""
        return self

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """How many tokens the model reads for ``messages``: the chat-formatted prompt :meth:`generate` feeds it.
        Tokenizes only: no lock, so it never waits on a generation."""
        return int(self.prompt_ids(messages).shape[1])

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, *, seed: int | None = None,
                 between: Callable[[], None] | None = None) -> Reply:
        """One reply to ``messages``. ``between``, when given, is called between two forward passes (after each
        ``prefill_chunk`` tokens of the prompt and after each new token), on this thread: the API's generation
        pool answers shorter chats there. The torch RNG is restored after each call, so what ran in between
        does not change this reply."""
        import torch

        with self._lock:
            ids = self.prompt_ids(messages)
            if seed is not None:
                torch.manual_seed(seed)
            eos = self.tokenizer.eos_token_id
            with torch.inference_mode():
                steps: dict[str, Any] = {}
                if between is not None:
                    pause = _keeping_rng(between)
                    steps["stopping_criteria"] = _after_every_token(pause)
                    if ids.shape[1] > self.prefill_chunk:
                        steps["past_key_values"] = self._prefill(ids, pause)
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=self.temperature > 0,
                    temperature=self.temperature if self.temperature > 0 else None,
                    top_p=self.top_p if self.temperature > 0 and self.top_p < 1 else None,
                    pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
                    eos_token_id=eos,
                    **steps,
                )
            new = out[0, ids.shape[1]:]
            finished = eos is not None and bool((new == eos).any())
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            return Reply(text, self.version, finished)

    def _prefill(self, ids: Any, pause: Callable[[], None]) -> Any:
        """The KV cache of all but the prompt's last token (``generate`` reads that one), filled ``prefill_chunk``
        tokens at a time with ``pause()`` after each chunk. Same tokens as one pass (checked greedily)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        end = ids.shape[1] - 1
        for start in range(0, end, self.prefill_chunk):
            self.model(input_ids=ids[:, start:min(start + self.prefill_chunk, end)], past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
            pause()
        return cache

    def generate_many(self, prompts: list[str], max_new_tokens: int, *, samples: int = 1, seed: int = 0,
                      batch: int = 96, max_prompt_tokens: int = 64) -> list[list[Reply]]:
        """``samples`` answers to each single-turn prompt, generated in left-padded batches of about ``batch``
        answers (a chat service's batch path: many conversations at once, not one request at a time); seeded,
        so the same prompts give the same answers. Prompts of similar length share a batch, and each prompt is
        read once however many answers it gets. Returns one list of replies per prompt, in the prompts' order."""
        import torch

        order = shortest_first(self.tokenizer, prompts, max_prompt_tokens)
        per_batch = max(batch // max(samples, 1), 1)  # prompts a batch
        replies: dict[int, list[Reply]] = {}
        with self._lock:
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            try:
                for i in range(0, len(order), per_batch):
                    progress.report("answers generated", i, len(order))
                    idx = order[i:i + per_batch]
                    ro = sample(self.model, self.tokenizer, [prompts[j] for j in idx], max_new_tokens=max_new_tokens,
                                temperature=self.temperature, greedy=self.temperature <= 0,
                                max_prompt_tokens=max_prompt_tokens, samples=samples)
                    got = [Reply(t.strip(), self.version, bool(f)) for t, f in zip(ro.texts, ro.finished, strict=True)]
                    for k, j in enumerate(idx):
                        replies[j] = got[k * samples:(k + 1) * samples]
            finally:
                torch.set_rng_state(state)
        progress.report("answers generated", len(order), len(order))
        return [replies[j] for j in range(len(prompts))]
