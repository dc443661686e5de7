"""The frozen-trunk reward model (``trainable_layers >= 0``) on a tiny random Llama: the cached trunk states
followed by the top layers give the whole model's rewards; only the top trains; a saved model keeps only its top
and loads back to the same rewards; the chat encoding marks the response's tokens."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from flywheel.settings import Settings
from tests.tiny import tiny_pairs, tiny_policy_dir
from training.config import RewardRecipe
from training.reward.model import RewardModel
from training.reward.train import cached_trunk_states

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PROMPTS = ["hello world what is the capital", "how is paris"]
REPLIES = ["paris is the capital of france", "yes"]


@pytest.fixture
def llama(tmp_path):
    return tiny_policy_dir(tmp_path / "llama", chat_template=True)


@pytest.mark.parametrize("pooling", ["last", "response", "mean"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_cached_trunk_states_then_the_top_layers_give_the_whole_models_rewards(llama, k, pooling):
    rm = RewardModel.from_backbone(llama, pooling=pooling, max_length=48, encoding="chat", trainable_layers=k).eval()
    enc = rm.encode(PROMPTS, REPLIES)
    with torch.no_grad():
        whole = rm(**enc)
        cache: dict[bytes, torch.Tensor] = {}
        cached = cached_trunk_states(rm, enc, cache)
        assert "input_ids" not in cached and cached["states"].dtype == torch.float16
        assert len(cache) == 2
        via_cache = rm(**cached)
    assert torch.allclose(whole, via_cache, atol=2e-2), (whole, via_cache)  # float16 states
    again = cached_trunk_states(rm, enc, cache)  # nothing computed twice
    assert len(cache) == 2 and torch.equal(again["states"], cached["states"])


def test_the_chat_encoding_marks_the_response_and_cuts_the_prompt_from_its_start(llama):
    rm = RewardModel.from_backbone(llama, pooling="last", max_length=24, encoding="chat", trainable_layers=1)
    long_prompt = " ".join(["hello world the a is of to and"] * 6) + " what is the capital of france"
    enc = rm.encode([long_prompt], ["paris is the capital"])
    ids, kinds = enc["input_ids"][0], enc["token_type_ids"][0]
    assert len(ids) <= 24
    tok = rm.tokenizer
    assert tok.decode(ids[kinds.bool()]).split()[:4] == ["paris", "is", "the", "capital"]
    assert "capital of france" in tok.decode(ids[~kinds.bool()])  # the prompt's end survives


def test_only_the_top_layers_and_the_head_train_and_a_saved_model_keeps_only_its_top(llama, tmp_path):
    from training.reward.train import train_reward

    pairs = tiny_pairs(60)
    before = RewardModel.from_backbone(llama, trainable_layers=1).backbone.state_dict()
    recipe = RewardRecipe(backbone=llama, pooling="last", encoding="chat", trainable_layers=1, max_length=48,
                          batch_size=8, max_steps=6, lr=1e-2, head_lr=1e-2, warmup_steps=1, threads=1)
    res = train_reward(Settings(home=tmp_path / "home"), recipe, "",
                       train_pairs=pairs[pairs["split"] == "train"].reset_index(drop=True),
                       eval_pairs=pd.DataFrame(pairs[pairs["split"] == "eval"]).reset_index(drop=True),
                       register_model=False)
    assert math.isfinite(res.metrics["eval/accuracy"])
    assert (res.model_dir / "top.pt").exists() and not (res.model_dir / "backbone").exists()
    loaded = RewardModel.load(res.model_dir)
    after = loaded.backbone.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("layers.1.", "norm.")) for k in moved), moved
    assert any(k.startswith("layers.1.") for k in moved)
    # the loaded model scores as the trained one did on its eval pairs
    again = RewardModel.load(res.model_dir)
    assert torch.equal(loaded.score(PROMPTS, REPLIES), again.score(PROMPTS, REPLIES))


def test_a_frozen_trunk_needs_a_decoder_and_fits_its_layers(tmp_path, llama):
    from tests.tiny import tiny_encoder_dir

    with pytest.raises(ValueError, match="decoder backbone"):
        RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "bert"), trainable_layers=1)
    with pytest.raises(ValueError, match="has 2 layers"):
        RewardModel.from_backbone(llama, trainable_layers=3)
    with pytest.raises(ValueError, match="chat template"):
        RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "bert2"), encoding="chat")
    with pytest.raises(ValueError, match="encoding"):
        RewardRecipe(encoding="concat")
