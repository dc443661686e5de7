"""The evaluation report: typed in the code, the same flat JSON on the wire, read back as it was written."""

from __future__ import annotations

import json
import math

from training.report import Evaluation, PolicyAnswers, PolicyMetrics, RewardMetrics


def test_a_policy_evaluation_round_trips_through_its_json_layout():
    report = Evaluation("flywheel-policy", "3", "2", "abc123",
                        PolicyMetrics(win_rate=0.61, win_rate_ci_low=0.52, kl=3.5, kl_base=7.0, rm_accuracy=0.7,
                                      rm_pairs=60.0, judge_independent=1.0),
                        PolicyMetrics(kl=0.0, refusal_rate=0.5), run_id="r1", judge="flywheel-reward/2",
                        reference="smollm2", base="smollm2", prompts=2, samples=[{"prompt": "p"}],
                        answers=PolicyAnswers(["p", "q"], ["a", "b"], ["c", "d"], [3, 4], [5, 6]))
    wire = json.loads(json.dumps(report.as_dict()))
    assert wire["kind"] == "policy" and wire["challenger"]["win_rate"] == 0.61
    assert "length_mean" not in wire["challenger"]  # not measured: left out, as a report always did
    assert Evaluation.from_dict(wire) == report


def test_a_reward_evaluation_keeps_its_audit_rules_in_the_flat_layout():
    side = RewardMetrics(accuracy=0.8, pairs=60.0, length_corr=-0.2, audit={"concise": 0.75},
                         audit_rule_pairs={"concise": 8.0})
    report = Evaluation("flywheel-reward", "2", None, "abc123", side)
    wire = json.loads(json.dumps(report.as_dict()))
    assert wire["challenger"]["audit/concise"] == 0.75 and wire["challenger"]["audit_pairs/concise"] == 8.0
    assert wire["kind"] == "reward" and wire["champion"] is None and not report.has_champion
    assert Evaluation.from_dict(wire) == report


def test_older_and_newer_reports_still_read():
    # an older report: no "kind", a NaN margin, a null judge accuracy; a newer one with a key this version lacks
    older = {"model": "flywheel-reward", "challenger_version": "1", "champion_version": None,
             "challenger": {"accuracy": 0.7, "mean_margin": math.nan, "pairs": 40}}
    read = Evaluation.from_dict(older)
    assert isinstance(read.challenger, RewardMetrics) and read.challenger.mean_margin is None
    assert read.challenger.pairs == 40.0 and read.kind == "reward"
    newer = {"model": "flywheel-policy", "kind": "policy", "challenger_version": "4", "champion_version": "4",
             "dataset_version": "d", "challenger": {"win_rate": 0.5, "rm_accuracy": None, "a_new_metric": 1.0},
             "champion": {"kl": 0.0}}
    read = Evaluation.from_dict(newer)
    assert read.challenger == PolicyMetrics(win_rate=0.5) and not read.has_champion  # compared with itself
