"""The pieces of `flywheel demo` that need no models: the simulated world's guarantees, the scenario, the
numbers and the report."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from flywheel.app.demo import DemoConfig, win_rate
from flywheel.app.demo_report import write_report
from flywheel.app.simulate import (
    HiddenPreference,
    SimConfig,
    reward_hacking_config,
    simulate_events,
    variants,
)
from pipelines.sharegpt import chat_samples

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def samples():
    return chat_samples(120)


def test_adding_adversaries_leaves_the_honest_users_events_exactly_as_they_were(samples):
    cfg = DemoConfig(honest_users=60, adversary_share=0.10)
    alone = simulate_events(samples, SimConfig(users=60, adversary_share=0.0, prompts=100, seed=7), now=NOW)
    mixed = simulate_events(samples, SimConfig(users=cfg.users, adversary_share=1 - 60 / cfg.users, prompts=100, seed=7),
                            now=NOW)
    roles = mixed.truth["users"]
    assert sum(r != "honest" for r in roles.values()) == cfg.users - 60 == 7
    assert [e for e in mixed.events if roles[e["user_id"]] == "honest"] == alone.events
    assert len(mixed.events) > len(alone.events)


def test_with_the_adversaries_filtered_the_curated_pairs_are_exactly_the_honest_users_alone(samples):
    """Why "10% adversaries" and "none" end at the same win rate: curation holds back every adversarial event
    and the same honest ones in both runs, so the reward model and PPO see the same pairs in the same order
    (measured in the demo: 0.782 with and without adversaries on seed 0, every cycle's number identical)."""
    from flywheel.app.simulate import lake_tables
    from ingest.filters import FilterConfig
    from pipelines.curation import build_dataset, unify_feedback

    def curated(users: int, share: float):
        sim = simulate_events(samples, SimConfig(users=users, adversary_share=share, prompts=100, seed=1), now=NOW)
        turns, frames = lake_tables(sim.events)
        ds = build_dataset(turns, unify_feedback(frames), FilterConfig(blocked_users=frozenset(sim.blocked_users)))
        return ds.pairs[["pair_id", "prompt", "chosen", "rejected", "source", "margin", "split"]].reset_index(drop=True), ds

    cfg = DemoConfig(honest_users=120, adversary_share=0.10)
    alone, _ = curated(120, 0.0)
    mixed, ds = curated(cfg.users, 1 - 120 / cfg.users)
    assert len(alone) > 200 and mixed.equals(alone)
    assert ds.quarantine["reason"].isin(["burst_rate", "vote_flip", "brigading", "blocked_account"]).any()


def test_the_hidden_preference_wants_concise_answers_that_still_say_something():
    pref = SimConfig().preference
    v = variants(chat_samples(5)[0])
    assert pref.score(v["direct"]) > pref.score(v["full"]) > pref.score(v["padded"])
    assert pref.score(v["terse"]) < pref.score(v["direct"])  # a three-word fragment says nothing
    assert len(v["terse"].split()) <= 3


def test_in_the_reward_hacking_scenario_clicks_reward_the_shortest_answer_and_disagree_with_the_preference(samples):
    honest = SimConfig(users=40, adversary_share=0.0, prompts=60, seed=1)
    cfg = reward_hacking_config(honest)
    # the same answers (fragments included) are served in both scenarios: only the clicks differ
    assert "terse" in honest.variants and cfg.variants == honest.variants
    assert cfg.rater is not None and cfg.rater != cfg.preference and replace(cfg, rater=None) == honest
    v = variants(samples[3])
    assert cfg.rater.score(v["terse"]) > cfg.rater.score(v["direct"])  # the clicks
    assert cfg.preference.score(v["terse"]) < cfg.preference.score(v["direct"])  # the truth
    sim = simulate_events(samples, cfg, now=NOW)
    corrections = [e["corrected_text"] for e in sim.events if e["type"] == "correction"]
    assert corrections and all(len(c.split()) <= 3 for c in corrections)  # users "correct" to the fragment
    assert sim.truth["rater"] != sim.truth["preference"]


def test_win_rate_counts_ties_half_and_carries_a_wilson_interval():
    score = HiddenPreference(noise=0.0).score
    r = win_rate(["a short answer that says enough"] * 3 + ["same length words here ok"],
                 ["a much longer answer with many more words than the other"] * 3 + ["same length words here ok"], score)
    assert r["win_rate"] == pytest.approx(3.5 / 4) and r["ties"] == 0.25 and r["prompts"] == 4
    assert r["ci_low"] < r["win_rate"] < r["ci_high"]


def test_demo_configuration_is_checked_and_quick_is_small():
    with pytest.raises(ValueError, match="scenario"):
        DemoConfig(scenario="nope")
    with pytest.raises(ValueError, match="adversary_share"):
        DemoConfig(adversary_share=1.0)
    with pytest.raises(ValueError, match="ppo_batch"):
        DemoConfig(ppo_batch=-1)
    with pytest.raises(ValueError, match="prompts"):
        DemoConfig(prompts=0)
    q = DemoConfig.quick(seed=3)
    assert q.cycles == 1 and q.seed == 3 and q.eval_prompts < DemoConfig().eval_prompts
    full = DemoConfig()
    assert q.honest_users < full.honest_users and q.prompts < full.prompts and q.model_samples < full.model_samples
    assert q.ppo_steps > 0 and q.ppo_batch > 0  # the full demo runs its recipe's PPO (0 = the recipe's)
    assert full.ppo_steps == 0 and full.ppo_batch == 0
    assert DemoConfig(honest_users=150, adversary_share=0.1).users == 167
    assert DemoConfig(honest_users=150, adversary_share=0.0).users == 150


def test_the_report_shows_each_cycle_its_decision_and_reasons(tmp_path):
    hidden = {"win_rate": 0.7, "ci_low": 0.63, "ci_high": 0.76, "prompts": 200, "ties": 0.05}
    promoted = {"trained": True, "version": "2", "start_policy": "models:/flywheel-policy/1", "reward_model_version": "1",
                "promoted": True, "action": "promote", "reasons": ["all 9 checks passed"], "champion_version": "1",
                "challenger": {"win_rate": 0.61, "lc_win_rate": 0.5, "kl": 1.2, "length_mean": 22.0, "no_eos_share": 0.4},
                "champion": {"length_mean": 30.0, "no_eos_share": 0.9}, "hidden_preference": hidden,
                "served_after": "flywheel-policy/2"}
    skipped = {"trained": False, "promoted": False, "action": "skip", "reasons": ["no reward model has passed the gate"]}
    cycle = {"number": 1, "start": "2026-11-23T10:00:00+00:00", "end": "2026-11-23T11:00:00+00:00", "events_sent": 900,
             "served_by": ["flywheel-policy/1"], "seconds": {"traffic": 10.0},
             "curation": {"dataset": "abc", "pairs": 300, "feedback_read": 500, "held_at_ingest": 5, "held_back": 40,
                          "held_back_by_reason": {"burst_rate": 40}, "pairs_by_source": {"thumbs": 300},
                          "agreement": {"items": 10, "percent_agreement": 0.9, "krippendorff_alpha": 0.8}},
             "filters": {"precision": 1.0, "recall": 0.98, "honest_held_back_share": 0.0, "recall_by_kind": {}},
             "reward": {"version": "1", "metrics": {"eval/accuracy": 0.93, "eval/length_corr": -0.4},
                        "hidden_preference_accuracy": 0.95, "hidden_preference_pairs": 30,
                        "labels_agree_with_hidden_preference": 0.97, "action": "promote", "reasons": ["all 2 checks passed"]},
             "policy": promoted}
    why = ("agreement with the trusted labelers on audit rule 'says_something' 0.083 (needs its 95% interval on 12 "
           "pairs, [0.015, 0.354], to reach 0.6)")
    refused = {**cycle, "number": 2, "reward": {**cycle["reward"], "action": "refuse", "reasons": [why],
                                                "audit": {"concise": 1.0, "says_something": 1 / 12}},
               "policy": skipped}
    summary = {"config": DemoConfig().__dict__, "run_dir": str(tmp_path), "preference": {"a": 1}, "rater": {"a": 1},
               "v1": "1", "final_champion": "2", "promotions": ["2"], "cycles": [cycle, refused],
               "final_vs_v1": hidden, "seconds": {"total": 300.0}}
    md = write_report(summary, tmp_path).read_text()
    assert "win rate 0.700 (95% CI 0.630–0.760) over 200 held-out prompts" in md
    assert "| 1 |" in md and "**promote**" in md and "after promotion: flywheel-policy/2" in md
    assert why in md and "audit pairs by rule: concise 1.000, says_something 0.083; gate **refuse**" in md
    assert "policy: not trained — no reward model has passed the gate" in md
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_the_champions_own_answers_are_served_rated_against_each_other_and_carry_its_version(samples):
    n = 60
    # answers of 6..11 words: the hidden preference ranks them by length (none under min_words, no filler)
    answers = [[" ".join(["word"] * (6 + (i + 2 * j) % 6)) for j in range(3)] for i in range(n)]
    cfg = SimConfig(users=100, adversary_share=0.0, prompts=n, seed=2)
    sim = simulate_events(samples, cfg, now=NOW, model_answers=answers, model_version="flywheel-policy/3")
    own = {a for row in answers for a in row}
    turns = {e["response_id"]: e for e in sim.events if e["type"] == "turn"}
    by_model = [t for t in turns.values() if t["model_version"] == "flywheel-policy/3"]
    assert by_model and all(t["response"] in own for t in by_model)
    assert all(t["response"] not in own for t in turns.values() if t["model_version"] == "sim-chat@1")
    feedback = [e for e in sim.events if e["type"] != "turn"]
    assert all(e["model_version"] == turns[e.get("response_id") or e.get("response_b_id")
                                            or e["discarded_response_id"]]["model_version"]
               for e in feedback if e["type"] in ("thumbs", "pairwise", "regenerate"))
    # thumbs on a model answer compare it with another answer of the same model: shorter ones are liked more
    thumbs = [(len(turns[e["response_id"]]["response"].split()), e["value"]) for e in feedback
              if e["type"] == "thumbs" and e["response_id"] in {t["response_id"] for t in by_model}]
    up_short = [v == "up" for w, v in thumbs if w <= 7]
    up_long = [v == "up" for w, v in thumbs if w >= 10]
    assert len(up_short) > 10 and len(up_long) > 10
    assert sum(up_short) / len(up_short) > 0.8 > 0.3 > sum(up_long) / len(up_long)
    # pairwise choices between two of the model's own answers exist: the comparisons the next gate's judge needs
    both_model = [e for e in feedback if e["type"] == "pairwise"
                  and turns[e["response_a_id"]]["response"] in own and turns[e["response_b_id"]]["response"] in own]
    assert len(both_model) >= 5
    # adversaries still leave the honest users' events as they were
    mixed = simulate_events(samples, SimConfig(users=111, adversary_share=1 - 100 / 111, prompts=n, seed=2), now=NOW,
                            model_answers=answers, model_version="flywheel-policy/3")
    assert [e for e in mixed.events if mixed.truth["users"][e["user_id"]] == "honest"] == sim.events
    with pytest.raises(ValueError, match="one non-empty list per prompt"):
        simulate_events(samples, cfg, now=NOW, model_answers=answers[:-1])


@pytest.mark.parametrize(("argv", "promotions", "status"), [
    ([], ["2"], 0), ([], [], 1),                                    # the full demo must show a promotion
    (["--quick"], [], 0), (["--quick"], ["2"], 0),                  # a smoke run: it ran, whatever the gate said
    (["--scenario", "reward-hacking"], [], 0), (["--scenario", "reward-hacking"], ["2"], 1),  # must refuse
    (["--quick", "--scenario", "reward-hacking"], ["2"], 1),
])
def test_the_demo_commands_exit_status_says_whether_its_claim_held(monkeypatch, argv, promotions, status):
    import flywheel.app.demo
    from flywheel.app.cli import main

    seen = {}

    def fake_run_demo(settings, cfg, run_dir=None, display=None):
        seen["cfg"] = cfg
        return {"promotions": promotions}

    monkeypatch.setattr(flywheel.app.demo, "run_demo", fake_run_demo)
    assert main(["demo", *argv]) == status
    assert seen["cfg"].cycles == (1 if "--quick" in argv else DemoConfig().cycles)
