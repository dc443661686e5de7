"""A few reward-model steps on a tiny random encoder: finite loss, parameters move, MLflow has the run and the
registered version; a killed run resumes from its checkpoint and ends at the same step count."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from flywheel.settings import Settings
from tests.tiny import kill_at_first_checkpoint_then_resume, tiny_encoder_dir, tiny_pairs, write_dataset
from training.config import RewardRecipe
from training.reward.model import RewardModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def env(tmp_path):
    backbone = tiny_encoder_dir(tmp_path / "backbone")
    uri = write_dataset(tmp_path / "lake", tiny_pairs(80))
    return Settings(home=tmp_path / "home"), backbone, uri


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_few_reward_steps_train_log_and_register(env, store, request):
    import mlflow
    from mlflow import MlflowClient

    from training.reward.train import load_registered_reward, train_reward

    settings, backbone, uri = env
    if store == "postgresql":  # the production tracking store: runs, metrics and the registry on PostgreSQL
        settings.mlflow.tracking_uri = request.getfixturevalue("postgres_tracking_uri")
    assert settings.mlflow.tracking_uri.startswith(store)
    recipe = RewardRecipe(backbone=backbone, max_length=32, batch_size=8, max_steps=12, lr=1e-3, head_lr=1e-2,
                          warmup_steps=1, log_every=2, threads=1)
    before = RewardModel.from_backbone(backbone).backbone.state_dict()
    result = train_reward(settings, recipe, uri)
    assert result.steps == 12 and result.model_version == "1"
    after = RewardModel.load(result.model_dir).backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "parameters did not change"

    client = MlflowClient(settings.mlflow.tracking_uri)
    run = client.get_run(result.run_id)
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4, 6, 8, 10, 12] and all(math.isfinite(m.value) for m in losses)
    assert run.data.tags["flywheel.dataset_version"] == "0123456789abcdef"
    assert run.data.params["recipe.max_steps"] == "12"
    assert 0.0 <= run.data.metrics["eval/accuracy"] <= 1.0 and "eval/ece" in run.data.metrics
    mv = client.get_model_version_by_alias("flywheel-reward", "challenger")
    assert str(mv.version) == "1" and mv.run_id == result.run_id and mv.tags["dataset_version"] == "0123456789abcdef"

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    loaded = load_registered_reward("models:/flywheel-reward@challenger")
    prompts, responses = ["hello world"], ["yes the capital"]
    assert torch.allclose(loaded.score(prompts, responses), RewardModel.load(result.model_dir).score(prompts, responses))
    pyfunc = mlflow.pyfunc.load_model("models:/flywheel-reward@challenger")
    import pandas as pd

    assert pyfunc.predict(pd.DataFrame({"prompt": prompts, "response": responses})).shape == (1,)


def test_a_killed_reward_run_resumes_from_its_checkpoint(env, tmp_path):
    settings, backbone, uri = env
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "flywheel.app.cli", "train", "reward", "--dataset", uri, "--recipe", "reward-minilm.yaml",
           "--checkpoint-dir", str(ckpt), "--set", f"backbone={backbone}", "--set", "max_steps=400",
           "--set", "batch_size=4", "--set", "max_length=32", "--set", "checkpoint_every=10", "--set", "threads=1",
           "--set", "log_every=10"]
    killed_at = kill_at_first_checkpoint_then_resume(cmd, settings.home, ckpt, 400)

    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow.tracking_uri)
    history = client.get_metric_history(killed_at["run_id"], "train/loss")
    assert max(m.step for m in history) == 400, "the resumed run logs into the killed run"
    runs = client.search_runs([r.experiment_id for r in client.search_experiments()])
    # one run for the model and one for its cross-fitted judge (reward-minilm.yaml has judge_fold), none for the kill
    assert sorted(r.data.tags["flywheel.recipe"] for r in runs) == ["reward-minilm", "reward-minilm-judge"]
    assert torch.load(ckpt / "judge" / "last.pt", weights_only=False)["step"] == 400


def test_eval_reward_reports_accuracy_against_labels_and_the_hidden_preference(tmp_path, capsys):
    import json

    from flywheel.app import cli

    pairs = tiny_pairs(50)
    pairs["rejected"] = pairs["rejected"] + " and the of to"  # the rejected side is always longer
    uri = write_dataset(tmp_path / "lake", pairs)
    model_dir = RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "backbone"), max_length=32).save(tmp_path / "rm")

    def run(length_weight: float) -> dict:
        truth = tmp_path / "truth.json"
        truth.write_text(json.dumps({"preference": {"length_weight": length_weight, "filler_weight": 0.0, "noise": 0.0,
                                                    "min_words": 0}}))
        assert cli.main(["eval-reward", "--model", str(model_dir), "--dataset", uri, "--truth", str(truth)]) == 0
        return json.loads(capsys.readouterr().out)

    os.environ["FLYWHEEL_HOME"] = str(tmp_path / "home")
    try:
        shorter, longer = run(1.0), run(-1.0)  # the hidden preference likes short answers, then long ones
    finally:
        del os.environ["FLYWHEEL_HOME"]
    assert shorter["eval_pairs"] == 10 and shorter["hidden_preference"]["pairs"] == 10
    assert shorter["labels_agree_with_hidden_preference"] == 1.0 and longer["labels_agree_with_hidden_preference"] == 0.0
    assert shorter["hidden_preference"]["accuracy"] == pytest.approx(shorter["accuracy"])
    assert longer["hidden_preference"]["accuracy"] == pytest.approx(1 - shorter["accuracy"])


def test_length_grouped_batches_cover_every_pair_once_and_cut_padding():
    import numpy as np

    from training.reward.train import batches

    lengths = np.random.default_rng(1).integers(20, 256, size=203)
    plain = batches(203, 16, seed=0, epoch=0)
    grouped = batches(203, 16, seed=0, epoch=0, lengths=lengths, group=8)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(203))
    assert [b.tolist() for b in grouped] == [b.tolist() for b in batches(203, 16, 0, 0, lengths, 8)]  # resumable
    assert [b.tolist() for b in grouped] != [b.tolist() for b in batches(203, 16, 0, 1, lengths, 8)]  # per epoch

    def padded_tokens(bs):  # every row padded to its batch's longest
        return sum(len(b) * lengths[b].max() for b in bs)

    assert padded_tokens(grouped) < 0.8 * padded_tokens(plain)


def test_chosen_and_rejected_sides_of_different_widths_train_together(tmp_path):
    """Every chosen text short, every rejected one long: the two encodings have different widths (found by
    bench/reward.py once long pairs were left out)."""
    import pandas as pd

    from training.reward.train import train_reward

    pairs = tiny_pairs(20)
    pairs["rejected"] = pairs["rejected"] + " " + " ".join(["world"] * 30)
    res = train_reward(Settings(home=tmp_path / "home"), RewardRecipe(backbone=tiny_encoder_dir(tmp_path / "bb"),
                       max_length=64, batch_size=4, max_steps=2, threads=1), "",
                       train_pairs=pairs[pairs["split"] == "train"].reset_index(drop=True),
                       eval_pairs=pd.DataFrame(pairs[pairs["split"] == "eval"]).reset_index(drop=True), register_model=False)
    assert res.steps == 2 and math.isfinite(res.metrics["eval/accuracy"])


def test_a_long_conversation_keeps_its_last_turn_and_the_reply(tmp_path):
    rm = RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "backbone"), max_length=32)
    prompt = " ".join(["hello world the a is of to and"] * 10) + " what is the capital of france"
    reply = "paris is the capital of france " + " ".join(["yes"] * 60)
    enc = rm.encode([prompt], [reply])
    text = rm.tokenizer.decode(enc["input_ids"][0][enc["attention_mask"][0].bool()])
    assert len(enc["input_ids"][0]) <= 32
    assert "what is the capital of france" in text  # the last turn survives
    assert "paris is the capital" in text  # the reply's beginning too
    assert rm.fit("short prompt", "short reply") == ("short prompt", "short reply")
    # the other ends, when the recipe says so; a saved model keeps its choice
    other = RewardModel(rm.backbone, rm.tokenizer, max_length=32, prompt_keep="start", response_keep="end")
    cut_p, cut_r = other.fit(prompt, reply)
    assert cut_p.startswith("hello world") and "capital of france" not in cut_p and cut_r.endswith("yes")
    assert RewardModel.load(other.save(tmp_path / "saved")).fit(prompt, reply) == (cut_p, cut_r)
    with pytest.raises(ValueError, match="prompt_keep"):
        RewardRecipe(prompt_keep="middle")


def test_a_cross_fitted_judge_learns_from_the_other_half_of_the_prompt_groups_and_is_registered_with_it(env):
    import mlflow

    from tests.tiny import tiny_pairs
    from training.evaluation import pick_judge
    from training.reward.train import judge_folds, load_registered_reward, train_reward

    settings, backbone, uri = env
    train = tiny_pairs(80)
    train = train[train["split"] == "train"]
    fold = judge_folds(train)
    assert 0.3 < fold.mean() < 0.7  # about half the prompt groups each
    assert not set(train[fold]["group_id"]) & set(train[~fold]["group_id"])
    assert (judge_folds(train) == fold).all()  # stable
    recipe = RewardRecipe(backbone=backbone, max_length=32, batch_size=8, max_steps=4, lr=1e-3, head_lr=1e-2,
                          warmup_steps=1, log_every=2, threads=1, judge_fold=True)
    result = train_reward(settings, recipe, uri)
    assert result.model_version == "1" and "judge/accuracy" in result.metrics and "eval/accuracy" in result.metrics

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    model = load_registered_reward("models:/flywheel-reward/1")
    judge = load_registered_reward("models:/flywheel-reward/1", part="judge")
    prompts, responses = ["hello world"] * 2, ["yes the capital", "no the capital"]
    assert not torch.allclose(model.score(prompts, responses), judge.score(prompts, responses))
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow.tracking_uri)
    assert client.get_model_version("flywheel-reward", "1").tags["judge"] == "fold"
    from training.config import GateRecipe

    got, label, independent = pick_judge(client, GateRecipe(judge="models:/flywheel-reward@challenger"), "1")
    assert independent and "cross-fitted" in label
    assert torch.allclose(got.score(prompts, responses), judge.score(prompts, responses))
    _, _, independent = pick_judge(client, GateRecipe(judge="models:/flywheel-reward@challenger"), None)
    assert not independent  # no version trained against: the recipe's judge, not independent
    with pytest.raises(FileNotFoundError):
        load_registered_reward(str(result.model_dir), part="judge")


def test_reviewed_pairs_weigh_more_when_the_recipe_says_so(tmp_path):
    """The same steps and batches: only the loss's weights differ, so the trained models differ."""
    import pandas as pd

    from training.reward.train import train_reward

    pairs = tiny_pairs(24)
    pairs["reviewed"] = [i % 2 == 0 for i in range(len(pairs))]
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    evalp = pd.DataFrame(pairs[pairs["split"] == "eval"]).reset_index(drop=True)
    backbone = tiny_encoder_dir(tmp_path / "bb")
    losses = {}
    for weight in (1.0, 4.0):
        res = train_reward(Settings(home=tmp_path / f"home{weight}"), RewardRecipe(
            backbone=backbone, max_length=64, batch_size=4, max_steps=3, threads=1, reviewed_weight=weight), "",
            train_pairs=train, eval_pairs=evalp, register_model=False)
        losses[weight] = res.metrics["eval/mean_margin"]
    assert losses[1.0] != losses[4.0]
    with pytest.raises(ValueError, match="reviewed_weight"):
        RewardRecipe(reviewed_weight=0.0)


def test_early_stopping_keeps_the_best_validated_model_and_stops_when_it_stops_improving(tmp_path):
    """Every step is validated on a tenth of the training prompt groups (never the eval split); after `patience`
    evaluations without a better accuracy training stops, and the model saved is the best step's."""
    import pandas as pd

    from training.reward.train import prompt_groups_share, train_reward

    pairs = tiny_pairs(120)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    evalp = pd.DataFrame(pairs[pairs["split"] == "eval"]).reset_index(drop=True)
    held = prompt_groups_share(train, 0.25, salt="validation")
    assert 0 < held.sum() < len(train) and not set(train["group_id"][held]) & set(train["group_id"][~held])
    recipe = RewardRecipe(backbone=tiny_encoder_dir(tmp_path / "bb"), max_length=32, batch_size=8, max_steps=60,
                          lr=1e-3, threads=1, eval_every=1, patience=2, validation_share=0.25)
    res = train_reward(Settings(home=tmp_path / "home"), recipe, "", train_pairs=train, eval_pairs=evalp,
                       register_model=False)
    m = res.metrics
    assert m["train/stopped_early"] == 1.0 and res.steps < 60 and m["train/best_step"] == res.steps - 2
    # the saved model is the best step's: it scores the validation pairs as well as that step did
    from training.reward.train import evaluate

    assert evaluate(RewardModel.load(res.model_dir), train[held].reset_index(drop=True))["accuracy"] == \
        pytest.approx(m["validation/best_accuracy"])
    with pytest.raises(ValueError, match="early stopping"):
        RewardRecipe(eval_every=5, validation_share=1.0)


def test_an_ensemble_of_heads_trains_on_bootstrap_resamples_and_reports_its_spread(tmp_path):
    """k heads on one backbone, each on its own Poisson(1) resample of the pairs: they end up different, the
    reward is their mean, the spread is logged, and a saved ensemble loads back with its k heads."""
    import pandas as pd

    from training.reward.train import train_reward

    pairs = tiny_pairs(40)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    evalp = pd.DataFrame(pairs[pairs["split"] == "eval"]).reset_index(drop=True)
    recipe = RewardRecipe(backbone=tiny_encoder_dir(tmp_path / "bb"), max_length=32, batch_size=8, max_steps=6,
                          lr=1e-3, head_lr=1e-2, threads=1, ensemble_heads=3)
    res = train_reward(Settings(home=tmp_path / "home"), recipe, "", train_pairs=train, eval_pairs=evalp,
                       register_model=False)
    model = RewardModel.load(res.model_dir)
    assert model.heads == 3 and res.metrics["eval/spread"] > 0
    prompts, answers = evalp["prompt"].tolist(), evalp["chosen"].tolist()
    each = model.score(prompts, answers, all_heads=True)
    assert each.shape == (len(evalp), 3) and not torch.allclose(each[:, 0], each[:, 1])
    mean, spread = model.score_spread(prompts, answers)
    assert torch.allclose(mean, model.score(prompts, answers), atol=1e-6) and (spread > 0).all()
    with pytest.raises(ValueError, match="ensemble_heads"):
        RewardRecipe(ensemble_heads=0)


def _length_pairs(n: int, seed: int):
    """Pairs whose preference is all in the reply's length, in words: a reply under four words says nothing and
    loses; otherwise the shorter reply wins. Every reply is a run of the same few words, so only length tells."""
    import random

    import pandas as pd

    from tests.tiny import WORDS

    rng = random.Random(seed)

    def reply(words: int) -> str:
        return " ".join(rng.choice(WORDS[:8]) for _ in range(words))

    def worth(words: int) -> float:
        return -1.0 if words < 4 else -words / 100

    rows = []
    for i in range(n):
        a, b = rng.sample([2, 3, 6, 9, 14, 20, 30, 45, 70, 90], 2)
        good, bad = (a, b) if worth(a) > worth(b) else (b, a)
        rows.append({"pair_id": f"p{i}", "prompt": reply(5), "chosen": reply(good), "rejected": reply(bad),
                     "source": "pairwise", "margin": 2 / 3, "group_id": f"g{i}", "split": "train", "event_ids": [f"e{i}"]})
    return pd.DataFrame(rows)


def test_the_length_curve_learns_that_too_short_says_nothing_and_shorter_is_better(tmp_path):
    """With the length feature in words and its curve, the head's length part starts at the pairs' own
    Bradley-Terry fit on length: a frozen backbone (lr 0) and two steps rank held-out pairs by length alone,
    fragments included, which log length by itself cannot (it can only say "shorter" or "longer"). The length
    is the whole reply's, not what max_length kept, and a saved model keeps its unit and curve."""
    from training.reward.train import evaluate, train_reward

    train, held = _length_pairs(120, seed=0), _length_pairs(60, seed=1)

    def fit(**kw):
        recipe = RewardRecipe(backbone=tiny_encoder_dir(tmp_path / "bb"), max_length=32, batch_size=16, max_steps=2,
                              lr=0.0, head_lr=1e-3, threads=1, length_feature=True, length_unit="words", **kw)
        res = train_reward(Settings(home=tmp_path / "home"), recipe, "", train_pairs=train, eval_pairs=held,
                           register_model=False)
        return res, RewardModel.load(res.model_dir)

    res, model = fit(length_curve=True)
    assert model.length_unit == "words" and model.length_curve and model.length_columns == 10
    assert res.metrics["eval/accuracy"] >= 0.95
    curve = model.length_reward(torch.tensor([2, 3, 6, 30, 90]))
    assert curve[0] < curve[2] and curve[1] < curve[2] and curve[2] > curve[3] > curve[4]
    # 70 and 90 words are both cut to 32 tokens; the feature still tells them apart
    prompt = held.iloc[0]["prompt"]
    r = model.score([prompt, prompt], [" ".join(["yes"] * 70), " ".join(["yes"] * 90)])
    assert r[0] > r[1]
    # log length alone cannot say "too short": the fragments' pairs pull its one weight both ways
    _, plain = fit(length_curve=False)
    assert evaluate(plain, held)["accuracy"] < res.metrics["eval/accuracy"] - 0.1
    with pytest.raises(ValueError, match="length_curve"):
        RewardRecipe(length_curve=True)
    with pytest.raises(ValueError, match="length_unit"):
        RewardRecipe(length_feature=True, length_unit="characters")


def test_a_model_saved_before_the_length_unit_counts_the_tokens_it_kept(tmp_path):
    """A saved model whose metadata predates the unit loads with the count it was trained with: the tokens left
    after the cut to max_length."""
    import json

    rm = RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "bb"), max_length=16, length_feature=True)
    with torch.no_grad():
        rm.head.weight[:, -1] = -1.0
    path = rm.save(tmp_path / "saved")
    meta = json.loads((path / "reward.json").read_text())
    assert meta["length_unit"] == "tokens"
    del meta["length_unit"], meta["length_curve"]
    (path / "reward.json").write_text(json.dumps(meta))
    old = RewardModel.load(path)
    old.tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # mark the reply's tokens
    assert old.length_unit == "kept_tokens" and "response_length" not in old.encode(["p"], ["a b"])
    long = [" ".join(["yes"] * 40), " ".join(["yes"] * 80)]  # both cut to the same kept tokens
    assert torch.allclose(*old.score(["p", "p"], long).unbind())
    assert not torch.allclose(*RewardModel.load(rm.save(tmp_path / "new")).score(["p", "p"], long).unbind())
