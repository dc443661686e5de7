"""Our decoding loop (``training.generation.sample``) against transformers' ``generate``, and the batch paths
built on it (the chat service's ``generate_many``, the gate's ``answer``): same answers, the prompts' order
kept, the sampling distribution the one asked for, log-probabilities equal to a forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import tiny_causal_lm, tiny_tokenizer

PROMPTS = ["hello", "what is the capital of france please", "why", "how is paris and the world of france",
           "thanks a lot", "the capital"]


@pytest.fixture(scope="module")
def lm_tok():
    tok = tiny_tokenizer()
    return tiny_causal_lm(len(tok), seed=1), tok


def test_greedy_answers_are_generates_and_a_prompt_read_once_for_many_samples_answers_the_same(lm_tok):
    from training.generation import encode_prompts, sample

    lm, tok = lm_tok
    enc = encode_prompts(tok, PROMPTS, 32, "cpu")
    assert (enc["attention_mask"] == 0).any()  # prompts of different lengths: rows are left-padded
    want = lm.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id)
    ro = sample(lm, tok, PROMPTS, max_new_tokens=12, greedy=True, max_prompt_tokens=32)
    assert torch.equal(ro.input_ids, want)
    shared = sample(lm, tok, PROMPTS, max_new_tokens=12, greedy=True, max_prompt_tokens=32, samples=3)
    assert torch.equal(shared.input_ids, want.repeat_interleave(3, 0))
    assert shared.texts == [t for t in ro.texts for _ in range(3)]


def test_after_eos_a_row_gets_padding_and_the_loop_stops_once_every_row_has_ended(lm_tok):
    from training.generation import sample

    lm, tok = lm_tok
    biased = tiny_causal_lm(len(tok), seed=1)
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 1.0  # EOS a little likelier: rows end after 1 to about 16 tokens
    biased.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    torch.manual_seed(0)
    ro = sample(biased, tok, PROMPTS * 4, max_new_tokens=40, temperature=1.0, max_prompt_tokens=32)
    resp = ro.input_ids[:, ro.prompt_len:]
    assert ro.finished.all() and resp.shape[1] < 40  # stopped when the last row ended, not at the limit
    assert ro.mask.sum(1).min() < resp.shape[1]  # and rows that ended earlier were padded meanwhile
    for row, m in zip(resp, ro.mask, strict=True):
        end = int((row == tok.eos_token_id).nonzero()[0]) + 1
        assert m[:end].eq(1).all() and m[end:].eq(0).all()
        assert row[end:].eq(tok.pad_token_id).all()


def test_a_token_is_drawn_from_the_softmax_at_the_temperature_and_within_the_top_k():
    from training.generation import next_tokens

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0])
    rows = 40_000
    torch.manual_seed(0)
    for temperature in (0.7, 1.5):
        drawn = next_tokens(logits.expand(rows, -1), temperature=temperature, top_k=0, greedy=False)
        freq = np.bincount(drawn.numpy(), minlength=len(logits)) / rows
        want = torch.softmax(logits / temperature, -1).numpy()
        # 4.5 binomial standard deviations: a wrong distribution (or temperature) is far outside, a right one inside
        assert np.all(np.abs(freq - want) <= 4.5 * np.sqrt(want * (1 - want) / rows) + 1e-9), (temperature, freq, want)
    drawn = next_tokens(logits.expand(rows, -1), temperature=1.0, top_k=2, greedy=False)
    freq = np.bincount(drawn.numpy(), minlength=len(logits)) / rows
    assert freq[2:].sum() == 0
    assert abs(freq[0] - torch.softmax(logits[:2], -1)[0].item()) < 0.02
    assert next_tokens(logits.expand(3, -1), temperature=1.0, top_k=0, greedy=True).tolist() == [0, 0, 0]


def test_log_probabilities_from_generation_and_from_the_response_positions_equal_a_full_forward_pass(lm_tok):
    from training.generation import response_logits_to_keep, sample, token_logprobs

    lm, tok = lm_tok
    torch.manual_seed(3)
    ro = sample(lm, tok, PROMPTS, max_new_tokens=10, temperature=1.0, max_prompt_tokens=32, samples=2,
                with_logprobs=True)
    with torch.no_grad():
        full = lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
        kept = lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                  logits_to_keep=response_logits_to_keep(ro.input_ids, ro.prompt_len)).logits
    assert kept.shape[1] == ro.input_ids.shape[1] - ro.prompt_len + 1 < full.shape[1]
    from_full = token_logprobs(full, ro.input_ids, ro.prompt_len)
    assert torch.allclose(token_logprobs(kept, ro.input_ids, ro.prompt_len), from_full, atol=1e-5)
    assert ro.logprobs is not None and ro.logprobs.shape == ro.mask.shape
    assert torch.allclose(ro.logprobs * ro.mask, from_full * ro.mask, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_at_a_temperature_every_log_probability_is_log_softmax_of_logits_over_it(lm_tok, temperature):
    """The sampler's, the trainer's (token_logprobs) and the gate's KL all read log_softmax(logits / T)."""
    from training.config import GateRecipe
    from training.evaluation import answer
    from training.generation import sample, token_logprobs
    from training.policy.ppo_math import kl_k3

    lm, tok = lm_tok
    torch.manual_seed(5)
    ro = sample(lm, tok, PROMPTS, max_new_tokens=10, temperature=temperature, max_prompt_tokens=32, with_logprobs=True)
    with torch.no_grad():
        logits = lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
    ids = ro.input_ids[:, ro.prompt_len:, None]
    want = torch.log_softmax(logits[:, ro.prompt_len - 1:-1].float() / temperature, -1).gather(2, ids)[..., 0]
    assert torch.allclose(ro.logprobs * ro.mask, want * ro.mask, atol=1e-4)
    assert torch.allclose(token_logprobs(logits, ro.input_ids, ro.prompt_len, temperature) * ro.mask,
                          want * ro.mask, atol=1e-5)
    at_one = token_logprobs(logits, ro.input_ids, ro.prompt_len)
    assert not torch.allclose(at_one * ro.mask, want * ro.mask, atol=1e-3)

    ref = tiny_causal_lm(len(tok), seed=2)
    recipe = GateRecipe(max_new_tokens=10, max_prompt_tokens=32, temperature=temperature, seed=9)
    got = answer(lm, tok, ref, PROMPTS[:1], recipe)
    torch.manual_seed(9)
    one = sample(lm, tok, PROMPTS[:1], max_new_tokens=10, temperature=temperature, max_prompt_tokens=32)
    with torch.no_grad():
        lp = torch.log_softmax(lm(input_ids=one.input_ids).logits[:, one.prompt_len - 1:-1] / temperature, -1)
        rp = torch.log_softmax(ref(input_ids=one.input_ids).logits[:, one.prompt_len - 1:-1] / temperature, -1)
    i = one.input_ids[:, one.prompt_len:, None]
    want_kl = float((kl_k3(lp.gather(2, i)[..., 0], rp.gather(2, i)[..., 0]) * one.mask).sum())
    assert got.kl[0] == pytest.approx(want_kl, rel=1e-3, abs=1e-5) and want_kl > 0


def test_the_chat_services_batches_and_the_gates_answers_come_back_in_the_prompts_order(lm_tok):
    from serving.policy import PolicyHandle
    from training.config import GateRecipe
    from training.evaluation import answer
    from training.generation import sample
    from training.policy.ppo_math import kl_k3

    lm, tok = lm_tok
    alone = [sample(lm, tok, [p], max_new_tokens=8, greedy=True, max_prompt_tokens=32).texts[0].strip()
             for p in PROMPTS]
    handle = PolicyHandle(lm, tok, "v1", temperature=0.0)
    # 4 answers a batch: 2 prompts a batch, taken shortest first, so the batches are not in the prompts' order
    replies = handle.generate_many(PROMPTS, 8, samples=2, batch=4, max_prompt_tokens=32)
    assert [[r.text for r in rs] for rs in replies] == [[a, a] for a in alone]

    recipe = GateRecipe(max_new_tokens=8, max_prompt_tokens=32, temperature=0.0)
    ref = tiny_causal_lm(len(tok), seed=2)
    got = answer(lm, tok, ref, PROMPTS, recipe, batch=2)
    assert [t.strip() for t in got.texts] == alone
    for p, kl, length in zip(PROMPTS, got.kl, got.lengths, strict=True):  # each prompt's own KL and length
        ro = sample(lm, tok, [p], max_new_tokens=8, greedy=True, max_prompt_tokens=32)
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ro.input_ids).logits[:, ro.prompt_len - 1:-1], -1)
            ref_logp = torch.log_softmax(ref(input_ids=ro.input_ids).logits[:, ro.prompt_len - 1:-1], -1)
        ids = ro.input_ids[:, ro.prompt_len:, None]
        want = float((kl_k3(logp.gather(2, ids)[..., 0], ref_logp.gather(2, ids)[..., 0]) * ro.mask).sum())
        assert kl == pytest.approx(want, rel=1e-3, abs=1e-5) and want > 0
        assert length == ro.mask.sum()


def test_serving_rollouts_and_the_gate_sample_the_same_way():
    from serving.policy import PolicyHandle
    from training.config import GateRecipe, PPORecipe, load_recipe
    from training.generation import SAMPLING

    handle = PolicyHandle(None, None, "v")
    assert (handle.temperature, handle.top_p) == (SAMPLING.temperature, SAMPLING.top_p) == (0.7, 1.0)
    assert PPORecipe().temperature == GateRecipe().temperature == SAMPLING.temperature
    for name in ("policy-ppo.yaml", "policy-ppo-demo.yaml", "policy-ppo-lora.yaml", "gate.yaml", "gate-demo.yaml"):
        assert load_recipe(name).temperature == SAMPLING.temperature, name


def test_a_multi_turn_conversation_gives_the_same_token_ids_from_the_lake_to_training_as_in_serving(tmp_path):
    """Curation keeps the conversation's messages; training renders them with the chat template; the token ids
    equal the ones serving feeds the model for the same messages on /v1/chat."""
    from datetime import UTC, datetime

    import pandas as pd
    from transformers import AutoTokenizer

    from ingest.filters import FilterConfig
    from pipelines.curation import build_dataset
    from pipelines.dataset import conversation
    from serving.policy import PolicyHandle
    from tests.tiny import tiny_policy_dir
    from training.generation import encode_prompts, flatten_prompt

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir(tmp_path / "p", chat_template=True))
    messages = [{"role": "user", "content": "what is the capital of france"},
                {"role": "assistant", "content": "paris"},
                {"role": "user", "content": "why is paris the capital"}]
    at = pd.Timestamp(datetime(2026, 11, 22, 10, tzinfo=UTC))
    raw = pd.DataFrame([{"event_id": "t1", "response_id": "r1", "user_id": "u", "occurred_at": at, "response": "yes",
                         "model_version": "m@1", "messages": messages}])
    feedback = pd.DataFrame(columns=["event_id", "type", "user_id", "occurred_at", "response_id", "other_response_id",
                                     "value", "corrected_text"]).astype({"occurred_at": "datetime64[us, UTC]"})
    ds = build_dataset(raw, feedback, FilterConfig())
    prompt = conversation(ds.prompts["messages"][0])
    assert prompt == messages  # the conversation itself, not its flattened text
    assert flatten_prompt(prompt) == ds.prompts["prompt"][0]  # ... which is what reward models read
    enc = encode_prompts(tok, [prompt], 512, "cpu")
    training_ids = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
    serving_ids = PolicyHandle(None, tok, "v").prompt_ids(messages)[0].tolist()
    assert training_ids == serving_ids
    assert conversation('[{"role": "user", "content": "hi"}]') == "hi"  # one user message stays a plain prompt


def test_a_conversation_too_long_for_the_budget_loses_its_oldest_messages_first(tmp_path):
    from transformers import AutoTokenizer

    from tests.tiny import tiny_policy_dir
    from training.generation import fit_prompts, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir(tmp_path / "p", chat_template=True))
    old = {"role": "user", "content": " ".join(["capital"] * 30)}
    last = {"role": "user", "content": "why is paris the capital"}
    (fitted,) = fit_prompts(tok, [[old, {"role": "assistant", "content": "paris"}, last]], 24)
    assert fitted == [last]  # the message to answer survives whole
    assert len(tok(render_prompt(tok, fitted), add_special_tokens=False)["input_ids"]) <= 24
    (cut,) = fit_prompts(tok, [[{"role": "user", "content": " ".join(["paris"] * 40)}]], 24)
    assert len(tok(render_prompt(tok, cut), add_special_tokens=False)["input_ids"]) <= 24
    assert render_prompt(tok, cut).endswith("<s> assistant ")  # cut in the user's text, the assistant turn kept
