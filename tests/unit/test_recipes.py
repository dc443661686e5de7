"""Every recipe in configs/ parses into its config class; typos and wrong kinds are errors."""

from __future__ import annotations

import pytest

from training.config import (
    CONFIGS_DIR,
    GateRecipe,
    PPORecipe,
    PreferenceOptRecipe,
    RewardRecipe,
    load_recipe,
    parse_recipe,
)

RECIPES = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_there_are_recipes_for_every_kind():
    kinds = {type(load_recipe(p)) for p in RECIPES}
    assert kinds == {RewardRecipe, PPORecipe, PreferenceOptRecipe, GateRecipe}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_unknown_keys_and_kinds_are_errors():
    with pytest.raises(ValueError, match="unknown reward recipe keys \\['lerning_rate'\\]"):
        parse_recipe({"kind": "reward", "lerning_rate": 1e-3})
    with pytest.raises(ValueError, match="recipe kind must be one of"):
        parse_recipe({"kind": "sft"})
    assert parse_recipe({"kind": "ppo"}, {"steps": 3}).steps == 3
    assert parse_recipe({"kind": "ppo", "lora_targets": ["q_proj"]}).lora_targets == ("q_proj",)


def test_hh_rlhf_rows_split_into_prompt_and_final_replies():
    from training.reward.hh import split_conversation

    c = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Paris."
    r = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Capital of France?\n\nAssistant: Lyon."
    assert split_conversation(c, r) == ("Human: Hi?\n\nAssistant: Hello.\n\nHuman: Capital of France?", "Paris.", "Lyon.")
    assert split_conversation(c, c) is None  # chosen == rejected
    assert split_conversation(c, r.replace("Hello.", "Hey.")) is None  # differ before the final reply


def test_values_get_their_field_types_or_a_clear_error():
    r = parse_recipe({"kind": "ppo"}, {"lr": "1e-3", "steps": 30.0, "lora": True, "lora_targets": ["q_proj"]})
    assert r.lr == 1e-3 and isinstance(r.lr, float) and r.steps == 30 and isinstance(r.steps, int)
    with pytest.raises(ValueError, match="steps=2.5: expected an integer"):
        parse_recipe({"kind": "ppo", "steps": 2.5})
    with pytest.raises(ValueError, match="lora='yes please': expected true or false"):
        parse_recipe({"kind": "ppo", "lora": "yes please"})
    with pytest.raises(ValueError, match="lr='fast'"):
        parse_recipe({"kind": "reward", "lr": "fast"})


def test_choice_fields_name_what_they_accept():
    with pytest.raises(ValueError, match="reward_norm must be one of \\('batch', 'reward_model', 'none'\\)"):
        parse_recipe({"kind": "ppo", "reward_norm": "whiten"})
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        parse_recipe({"kind": "ppo", "kl_estimator": "k2"})
    for kind in ("reward", "ppo"):  # a device typo fails when the recipe is read, before any model is loaded
        with pytest.raises(ValueError, match="device must be one of \\('auto', 'cpu', 'cuda'\\), got 'gpu'"):
            parse_recipe({"kind": kind, "device": "gpu"})


def test_a_recipe_inherits_from_the_base_it_names_field_by_field(tmp_path):
    import yaml

    from training.config import GateRecipe, load_recipe

    demo = load_recipe("gate-demo.yaml")
    gate = load_recipe("gate.yaml")
    assert isinstance(demo, GateRecipe) and demo.name == "gate-demo" and demo.max_new_tokens == 32
    assert demo.audit == gate.audit and demo.min_win_rate_ci_low == gate.min_win_rate_ci_low  # from the base
    assert demo.max_length_correlation == 0.9 != gate.max_length_correlation  # overridden
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"base": "b.yaml", "kind": "gate", "eval_prompts": 7}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"base": "gate.yaml", "kind": "gate", "threads": 3}))
    chained = load_recipe(tmp_path / "a.yaml")
    assert (chained.eval_prompts, chained.threads, chained.name) == (7, 3, "gate")  # a chain: a -> b -> configs/gate.yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": "d.yaml", "kind": "gate"}))
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"base": "c.yaml", "kind": "gate"}))
    with pytest.raises(ValueError, match="come back to it"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"base": "gate.yaml", "kind": "reward"}))
    with pytest.raises(ValueError, match="cannot have the gate recipe"):
        load_recipe(tmp_path / "e.yaml")
    (tmp_path / "f.yaml").write_text(yaml.safe_dump({"base": "gate.yaml", "kind": "gate", "no_such_key": 1}))
    with pytest.raises(ValueError, match="unknown gate recipe keys"):
        load_recipe(tmp_path / "f.yaml")
