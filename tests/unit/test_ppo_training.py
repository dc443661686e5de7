"""A few PPO steps with a tiny random policy and a tiny reward model: finite losses, parameters move, KL and
reward logged, the run and the registered challenger exist in MLflow; a killed run resumes to the same step."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flywheel.settings import Settings
from tests.tiny import (
    kill_at_first_checkpoint_then_resume,
    tiny_encoder_dir,
    tiny_pairs,
    tiny_policy_dir,
    tiny_tokenizer,
    write_dataset,
)
from training.config import PPORecipe
from training.reward.model import RewardModel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path):
    reward = RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "rm-backbone"), max_length=64)
    reward.save(tmp_path / "reward")
    return (Settings(home=tmp_path / "home"), tiny_policy_dir(tmp_path / "policy"), str(tmp_path / "reward"),
            write_dataset(tmp_path / "lake", tiny_pairs(40)))


def recipe(policy: str, reward: str, **kw) -> PPORecipe:
    base = dict(policy=policy, reward_model=reward, prompts=16, eval_prompts=4, max_new_tokens=8, rollout_batch=4,
                minibatch=2, ppo_epochs=2, steps=3, lr=1e-3, value_lr=1e-3, threads=1, samples_per_prompt=2)
    return PPORecipe(**{**base, **kw})


@pytest.mark.parametrize(("lora", "advantage"), [(False, "gae"), (True, "rloo")])
def test_a_few_ppo_steps_train_log_and_register(env, lora, advantage):
    from mlflow import MlflowClient

    from training.policy.ppo import train_ppo

    settings, policy, reward, uri = env
    from transformers import AutoModelForCausalLM

    if lora:  # the reward model as PPO finds it in production: registered in MLflow, by alias
        import mlflow

        from training.reward.train import log_and_register
        from training.tracking import use_tracking

        use_tracking(settings, "flywheel-reward")
        with mlflow.start_run() as rm_run:
            rm_version = log_and_register(Path(reward), rm_run.info.run_id, "0123456789abcdef", {})
        mlflow.set_tracking_uri("sqlite:///" + str(Path(settings.home) / "elsewhere.db"))  # train_ppo must set it
        reward = "models:/flywheel-reward@challenger"
    before = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    res = train_ppo(settings, recipe(policy, reward, lora=lora, lora_targets=("q_proj", "v_proj"), advantage=advantage,
                                     samples_per_prompt=2 if advantage == "rloo" else 1), uri)
    assert res.steps == 3 and res.version == "1" and res.kind == "ppo"
    after = AutoModelForCausalLM.from_pretrained(res.policy_dir).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not change"
    client = MlflowClient(settings.mlflow.tracking_uri)
    for key in ("ppo/reward", "ppo/kl", "ppo/entropy", "ppo/response_length", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/policy_loss", *(["ppo/value_loss"] if advantage == "gae" else [])):
        hist = client.get_metric_history(res.run_id, key)
        assert [m.step for m in hist] == [1, 2, 3] and all(math.isfinite(m.value) for m in hist), key
    run = client.get_run(res.run_id)
    assert run.data.tags["flywheel.dataset_version"] == "0123456789abcdef"
    assert run.data.tags["flywheel.reward_model_version"] == (rm_version if lora else reward)
    assert {"eval/reward_before", "eval/reward_after", "eval/kl_after"} <= set(run.data.metrics)
    mv = client.get_model_version_by_alias("flywheel-policy", "challenger")
    assert mv.run_id == res.run_id and mv.tags["dataset_version"] == "0123456789abcdef"


def test_responses_are_masked_after_the_first_eos(env):
    from training.policy.ppo import PPOTrainer

    _settings, policy, reward, _uri = env
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    trainer = PPOTrainer(recipe(policy, reward), AutoModelForCausalLM.from_pretrained(policy), tok,
                         RewardModel.load(reward))
    torch.manual_seed(0)
    ro = trainer.generate(["hello world", "what is the capital of france"])
    resp = ro.input_ids[:, ro.prompt_len:]
    for row, m in zip(resp, ro.mask, strict=True):
        eos = (row == tok.eos_token_id).nonzero()
        end = int(eos[0]) + 1 if len(eos) else len(row)
        assert m[:end].eq(1).all() and m[end:].eq(0).all()


def test_scores_are_normalised_by_batch_or_by_the_reward_models_own_statistics(env):
    from training.policy.ppo import PPOTrainer

    _settings, policy, reward, _uri = env
    from transformers import AutoModelForCausalLM

    rm = RewardModel.load(reward)
    rm.stats = {"mean": 1.0, "std": 2.0}
    raw = torch.tensor([1.0, 3.0, 5.0, 41.0])

    def norm(**kw):
        trainer = PPOTrainer(recipe(policy, reward, reward_clip=5.0, **kw),
                             AutoModelForCausalLM.from_pretrained(policy), tiny_tokenizer(), rm)
        return trainer.normalise(raw)

    # (x - mean) / std with the reward model's numbers; 41 -> 20 is clipped to 5
    assert torch.allclose(norm(reward_norm="reward_model"), torch.tensor([0.0, 1.0, 2.0, 5.0]))
    batch = norm(reward_norm="batch")
    assert abs(float(batch.mean())) < 0.6 and float(batch.max()) <= 5.0
    assert torch.equal(norm(reward_norm="none"), torch.tensor([1.0, 3.0, 5.0, 5.0]))


def test_past_the_kl_guard_a_steps_remaining_updates_are_skipped(env):
    from transformers import AutoModelForCausalLM

    from training.policy.ppo import PPOTrainer

    _settings, policy, reward, _uri = env
    prompts = ["hello world", "what is the capital of france"]

    def kls(**kw):
        torch.manual_seed(0)
        trainer = PPOTrainer(recipe(policy, reward, lr=3e-2, ppo_epochs=4, target_kl=0.5, **kw),
                             AutoModelForCausalLM.from_pretrained(policy), tiny_tokenizer(), RewardModel.load(reward))
        steps = [trainer.train_step(prompts) for _ in range(6)]
        return [s["ppo/kl"] for s in steps], [s["ppo/early_stop"] for s in steps], [s["ppo/updates"] for s in steps]

    free, free_stops, free_updates = kls()
    guarded, stops, updates = kls(kl_guard=1.0)
    assert set(free_stops) == {0.0} and set(free_updates) == {8.0} and max(free[1:]) > 0.5  # it leaves the target
    assert any(s == 1.0 for s in stops) and min(updates) < 8, (stops, updates)  # the guard acted ...
    assert np.mean(guarded[2:]) < np.mean(free[2:])  # ... and kept the policy closer to the reference
    with pytest.raises(ValueError, match="kl_guard must be 0"):
        recipe(policy, reward, kl_guard=0.8)


def test_the_trainers_log_probabilities_are_the_samplers_at_the_sampling_temperature(env):
    """Old log-probabilities come from the sampler (no second pass) and equal log_softmax(logits / T) of a
    forward pass of the policy; the reference's are read at T too."""
    from transformers import AutoModelForCausalLM

    from training.policy.ppo import PPOTrainer

    _settings, policy, reward, _uri = env
    trainer = PPOTrainer(recipe(policy, reward, temperature=0.7), AutoModelForCausalLM.from_pretrained(policy),
                         tiny_tokenizer(), RewardModel.load(reward))
    torch.manual_seed(0)
    ro = trainer.generate(["hello world", "what is the capital of france"], samples=2)
    logp, ref_logp, values = trainer.logprobs_values(ro)
    assert values is None  # rloo: no critic
    with torch.no_grad():
        logits = trainer.model.lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
        with trainer._reference() as ref:
            ref_logits = ref(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits
    ids = ro.input_ids[:, ro.prompt_len:, None]
    want = torch.log_softmax(logits[:, ro.prompt_len - 1:-1].float() / 0.7, -1).gather(2, ids)[..., 0]
    want_ref = torch.log_softmax(ref_logits[:, ro.prompt_len - 1:-1].float() / 0.7, -1).gather(2, ids)[..., 0]
    assert torch.allclose(logp * ro.mask, want * ro.mask, atol=1e-4)
    assert torch.allclose(ref_logp * ro.mask, want_ref * ro.mask, atol=1e-4)
    at_one = torch.log_softmax(logits[:, ro.prompt_len - 1:-1].float(), -1).gather(2, ids)[..., 0]
    assert not torch.allclose(logp * ro.mask, at_one * ro.mask, atol=1e-3)  # the temperature matters here


def test_a_killed_ppo_run_resumes_from_its_checkpoint(env, tmp_path):
    settings, policy, reward, uri = env
    ckpt = tmp_path / "ckpt"
    recipe_file = tmp_path / "ppo.yaml"
    recipe_file.write_text(f"kind: ppo\npolicy: {policy}\nreward_model: {reward}\nprompts: 16\neval_prompts: 2\n"
                           "max_new_tokens: 4\nsamples_per_prompt: 2\nrollout_batch: 2\nminibatch: 2\nppo_epochs: 1\nsteps: 300\n"
                           "checkpoint_every: 2\nthreads: 1\n")
    cmd = [sys.executable, "-m", "flywheel.app.cli", "train", "policy", "--dataset", uri, "--recipe", str(recipe_file),
           "--checkpoint-dir", str(ckpt)]
    killed = kill_at_first_checkpoint_then_resume(cmd, settings.home, ckpt, 300)

    from mlflow import MlflowClient

    hist = MlflowClient(settings.mlflow.tracking_uri).get_metric_history(killed["run_id"], "ppo/reward")
    assert sorted({m.step for m in hist}) == list(range(1, 301)), "one metric per step, in the killed run"


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_dpo_and_kto_recipes_train_through_trl_and_register(env, tmp_path, kind):
    import pandas as pd
    from mlflow import MlflowClient

    from training.config import PreferenceOptRecipe
    from training.policy.prefopt import train_preference_opt

    settings, _policy, _reward, uri = env
    policy = tiny_policy_dir(tmp_path / "chat-policy", chat_template=True)
    d = Path(uri.removeprefix("file://"))
    pairs = pd.read_parquet(d / "pairs.parquet")
    unpaired = pd.concat([pairs.assign(completion=pairs["chosen"], label=True),
                          pairs.assign(completion=pairs["rejected"], label=False)])
    unpaired[["prompt", "completion", "label", "source", "group_id", "split", "event_ids"]].to_parquet(d / "unpaired.parquet")
    res = train_preference_opt(settings, PreferenceOptRecipe(kind=kind, policy=policy, max_steps=2, batch_size=4,
                                                             max_length=32, lr=1e-3, threads=1, lora=True,
                                                             lora_targets=("q_proj", "o_proj")), uri)
    assert res.steps == 2 and math.isfinite(res.metrics["train_loss"]) and res.kind == kind
    client = MlflowClient(settings.mlflow.tracking_uri)
    assert client.get_run(res.run_id).data.tags["flywheel.kind"] == kind
    assert client.get_model_version_by_alias("flywheel-policy", "challenger").run_id == res.run_id


def test_dpo_and_kto_rows_are_rendered_with_the_chat_template_as_ppo_and_serving_render_them(tmp_path):
    import pandas as pd
    from transformers import AutoTokenizer
    from trl import maybe_apply_chat_template

    from training.generation import render_prompt
    from training.policy.prefopt import conversational

    tok = AutoTokenizer.from_pretrained(tiny_policy_dir(tmp_path / "p", chat_template=True))
    rows = conversational(pd.DataFrame({"prompt": ["what is the capital"], "chosen": ["paris"], "rejected": ["no"]}))
    got = maybe_apply_chat_template(rows.iloc[0].to_dict(), tok)
    assert got["prompt"] == render_prompt(tok, "what is the capital") == "<s> user what is the capital </s> <s> assistant "
    assert got["chosen"].startswith("paris") and got["rejected"].startswith("no")
    one = conversational(pd.DataFrame({"prompt": ["why"], "completion": ["because"], "label": [True]}))
    assert maybe_apply_chat_template(one.iloc[0].to_dict(), tok)["prompt"] == render_prompt(tok, "why")


def test_long_prompts_are_cut_in_the_users_text_so_the_assistant_turn_survives():
    from tests.tiny import tiny_tokenizer
    from training.generation import fit_prompts, render_prompt

    tok = tiny_tokenizer()
    long = " ".join(["hello"] * 200)
    (cut,) = fit_prompts(tok, [long], 32)
    formatted = render_prompt(tok, cut)
    assert len(tok(formatted, add_special_tokens=False)["input_ids"]) <= 32
    assert formatted.rstrip().endswith("assistant:")  # the answer prompt is still there
    assert fit_prompts(tok, ["hello there"], 32) == ["hello there"]


def test_during_the_critic_warm_up_only_the_value_head_learns(env):
    from transformers import AutoModelForCausalLM

    from training.policy.ppo import PPOTrainer

    _settings, policy, reward, _uri = env
    trainer = PPOTrainer(recipe(policy, reward, advantage="gae", samples_per_prompt=1, critic_warmup_steps=1),
                         AutoModelForCausalLM.from_pretrained(policy), tiny_tokenizer(), RewardModel.load(reward))
    lm_before = {k: v.clone() for k, v in trainer.model.lm.state_dict().items()}
    head_before = trainer.model.value_head.weight.clone()
    torch.manual_seed(0)
    first = trainer.train_step(["hello world", "what is the capital of france", "how are you", "why"])
    assert first["ppo/critic_warmup"] == 1.0
    assert all(torch.equal(v, lm_before[k]) for k, v in trainer.model.lm.state_dict().items())  # the policy waited
    assert not torch.equal(trainer.model.value_head.weight, head_before)  # the critic learned
    trainer.train_step(["hello world", "what is the capital of france", "how are you", "why"])
    assert any(not torch.equal(v, lm_before[k]) for k, v in trainer.model.lm.state_dict().items())
