"""Tiny random models built from a config, for tests (no weights are downloaded)."""

from __future__ import annotations

from typing import Any

WORDS = ["hello", "world", "the", "a", "is", "of", "to", "and", "what", "how", "why", "yes", "no", "please", "thanks", "paris", "france", "capital"]


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_causal_lm(vocab_size: int, seed: int = 0) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


def tiny_encoder_dir(path: Any, seed: int = 0, **config: Any) -> str:
    """A tiny random BERT and its tokenizer saved as a local backbone directory (for reward-model tests);
    ``config`` overrides BertConfig fields (dropout probabilities, say)."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = BertModel(BertConfig(**{**dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=128, pad_token_id=0), **config}))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_pairs(n: int, seed: int = 0) -> Any:
    """Pairs with a learnable preference: the chosen answer says "yes", the rejected one "no"."""
    import random

    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(5))
        filler = " ".join(rng.choice(WORDS[:8]) for _ in range(rng.randint(1, 6)))
        rows.append({"pair_id": f"p{i}", "prompt": prompt, "chosen": f"yes {filler}", "rejected": f"no {filler}",
                     "source": "thumbs", "margin": 1.0, "group_id": f"g{i}", "split": "eval" if i % 5 == 0 else "train",
                     "event_ids": [f"e{i}"]})
    return pd.DataFrame(rows)


def write_dataset(root: Any, pairs: Any, version: str = "0123456789abcdef") -> str:
    """A curated-dataset directory with just what the trainers read (pairs + manifest)."""
    import json
    from pathlib import Path

    import pandas as pd

    d = Path(root) / "datasets" / version
    d.mkdir(parents=True)
    pairs.to_parquet(d / "pairs.parquet")
    prompts = pairs.drop_duplicates("prompt")[["prompt", "group_id", "split"]].assign(
        prompt_id=lambda df: [f"q{i}" for i in range(len(df))], n_turns=1)
    pd.DataFrame(prompts[["prompt_id", "prompt", "group_id", "split", "n_turns"]]).to_parquet(d / "prompts.parquet")
    (d / "manifest.json").write_text(json.dumps({"version": version, "pairs_by_source": {"thumbs": len(pairs)}}))
    return d.as_uri()


# ChatML in the tiny vocabulary's words (unknown ones read as <unk>): the shape of SmolLM2's template
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                      "{% if add_generation_prompt %}<s> assistant {% endif %}")


def tiny_policy_dir(path: Any, seed: int = 0, chat_template: bool = False) -> str:
    """A tiny random Llama and its tokenizer saved as a local policy directory (with a chat template on
    request)."""
    tok = tiny_tokenizer()
    if chat_template:
        tok.chat_template = TINY_CHAT_TEMPLATE
    tiny_causal_lm(len(tok), seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def kill_at_first_checkpoint_then_resume(cmd: list[str], home: Any, ckpt: Any, total_steps: int) -> dict[str, Any]:
    """Run a training command, SIGKILL it as soon as its first checkpoint exists, run it again to the end;
    asserts the kill landed mid-run and the rerun finished at ``total_steps``. Returns the killed checkpoint."""
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[1]
    last = Path(ckpt) / "last.pt"
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed = torch.load(last, weights_only=False)
    assert 0 < killed["step"] < total_steps
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert torch.load(last, weights_only=False)["step"] == total_steps
    return killed


def tiny_fixed_policy_dir(path: Any, eos_prob: float, seed: int = 0) -> str:
    """A tiny Llama whose next-token distribution is the same after every prefix: EOS with ``eos_prob``, the
    rest spread evenly over the words (0 = it never ends). Built by zeroing every block's output projections
    (the residual stream is then the embedding), giving every token the same embedding and aiming the output
    rows so that the logits are exactly the wanted log-probabilities. A real model, saved and loaded as one."""
    import math

    import torch

    tok = tiny_tokenizer()
    lm = tiny_causal_lm(len(tok), seed)
    with torch.no_grad():
        for layer in lm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        e = torch.randn(lm.config.hidden_size, generator=torch.Generator().manual_seed(seed))
        lm.model.embed_tokens.weight.copy_(e.expand_as(lm.model.embed_tokens.weight))
        n = lm.model.norm(e[None, None])[0, 0]
        words = len(tok) - 4
        logits = torch.full((len(tok),), -30.0)
        logits[4:] = math.log((1 - eos_prob) / words)
        logits[tok.eos_token_id] = math.log(eos_prob) if eos_prob > 0 else -30.0
        lm.lm_head.weight.copy_(logits[:, None] * n[None, :] / n.dot(n))
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def write_events_to_lake(settings: Any, events: list[dict[str, Any]], topic: str = "simulated") -> int:
    """Validate simulated events against the contract and write them with the consumer's lake sink (no
    broker, no API): for tests that start at the lake. Returns the rows written."""
    from flywheel.events import validate_event
    from flywheel.storage import open_storage
    from ingest.lake import LakeSink

    sink = LakeSink(open_storage(settings.lake.uri, settings.lake))
    for offset, e in enumerate(events):
        sink.add(validate_event(e), topic, 0, offset)
    return sink.flush().written
