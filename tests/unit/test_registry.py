"""Evaluation, the promotion gate and the registry history with real (tiny) models in MLflow.

The champion is a tiny policy that answers briefly (EOS with probability 0.25 after every token); the
deliberately worse challengers are one that never ends (EOS probability 0) and one with random weights. Both
must be refused, with the right reasons, for every seed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flywheel.settings import Settings
from tests.tiny import tiny_encoder_dir, tiny_fixed_policy_dir, tiny_pairs, tiny_policy_dir, write_dataset
from training.config import GateRecipe
from training.reward.model import RewardModel

LOOSE = dict(min_win_rate=0.0, min_win_rate_ci_low=0.0, min_lc_win_rate=0.0, max_kl=1e9, max_length_drift=1e9, max_no_eos_share=1.0, min_helpful_rate=0.0,
             min_rm_accuracy=0.0, min_audit_accuracy=0.0)


@pytest.fixture
def registry(tmp_path):
    """Settings on a fresh home; a tiny reward model registered; the brief base policy as champion v1."""
    import mlflow

    from training.registry import bootstrap_policy
    from training.reward.train import log_and_register
    from training.tracking import use_tracking

    settings = Settings(home=tmp_path / "home")
    uri = write_dataset(tmp_path / "lake", tiny_pairs(40))
    rm = RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "rm-backbone"), max_length=64)
    rm.save(tmp_path / "reward")
    use_tracking(settings, "flywheel-reward")
    with mlflow.start_run() as run:
        log_and_register(tmp_path / "reward", run.info.run_id, "0123456789abcdef", {})
    base = tiny_fixed_policy_dir(tmp_path / "brief", eos_prob=0.25)
    assert bootstrap_policy(settings, base=base, version_label="brief") == "1"
    assert bootstrap_policy(settings, base=base) == "1"  # idempotent: a champion exists
    return settings, uri, base, tmp_path


def register_policy(settings: Settings, path: str, dataset_uri: str, reference: str) -> str:
    import mlflow

    from training.policy.ppo import log_and_register_policy
    from training.tracking import use_tracking

    use_tracking(settings, "flywheel-policy")
    with mlflow.start_run() as run:
        return log_and_register_policy(Path(path), run.info.run_id, "0123456789abcdef", "1", {}, reference=reference)


def gate(**kw) -> GateRecipe:
    return GateRecipe(eval_prompts=8, max_new_tokens=16, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_challenger_that_never_ends_is_refused_for_its_length_every_time(registry, seed):
    from training.evaluation import evaluate_challenger
    from training.registry import AuditLog, alias_version, evaluation_of, gate_decision, promote
    from training.report import PolicyMetrics

    settings, uri, base, tmp = registry
    rambler = register_policy(settings, tiny_fixed_policy_dir(tmp / "rambler", eos_prob=0.0, seed=seed), uri, base)
    report = evaluate_challenger(settings, "flywheel-policy", rambler, dataset=uri, recipe=gate(seed=seed))
    ch, cp = report.challenger, report.champion
    assert isinstance(ch, PolicyMetrics) and isinstance(cp, PolicyMetrics)
    assert ch.no_eos_share == 1.0 and cp.no_eos_share is not None and cp.no_eos_share < 0.1 and ch.length_mean == 16
    assert ch.length_change is not None and ch.length_change > 1.0 and cp.kl == pytest.approx(0.0, abs=1e-4)
    assert "decision" not in report.as_dict()  # an evaluation measures; promotion decides, once
    # what was logged reads back as what was measured
    from mlflow import MlflowClient as Client

    assert evaluation_of(Client(settings.mlflow.tracking_uri), "flywheel-policy", rambler) == report
    assert not gate_decision(report, gate(seed=seed)).promote
    record = promote(settings, "flywheel-policy", rambler, gate=gate(seed=seed), actor="test")
    assert record.action == "refuse" and record.champion == "1"
    assert any(r.startswith("share of responses that never end 1.000") for r in record.reasons)
    assert any(r.startswith("relative change of mean response length") for r in record.reasons)
    from mlflow import MlflowClient

    assert alias_version(MlflowClient(settings.mlflow.tracking_uri), "flywheel-policy", "champion") == "1"
    assert [r.action for r in AuditLog.from_settings(settings).history("flywheel-policy")] == ["bootstrap", "refuse"]


def test_a_random_weights_challenger_is_refused_for_its_kl(registry):
    from training.evaluation import evaluate_challenger
    from training.registry import promote

    settings, uri, base, tmp = registry
    noise = register_policy(settings, tiny_policy_dir(tmp / "random", seed=7), uri, base)
    report = evaluate_challenger(settings, "flywheel-policy", noise, dataset=uri, recipe=gate())
    assert report.challenger.kl is not None and report.challenger.kl > 10
    assert report.champion is not None and report.champion.kl is not None and report.champion.kl < 1e-3
    record = promote(settings, "flywheel-policy", noise, gate=gate())
    assert record.action == "refuse"
    assert any(r.startswith("KL(policy ‖ reference) per response") for r in record.reasons)


def test_promote_rollback_and_a_history_that_survives_a_restart(registry):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from training.evaluation import evaluate_challenger
    from training.registry import GateError, alias_version, promote, rollback

    settings, uri, base, tmp = registry
    client = MlflowClient(settings.mlflow.tracking_uri)
    v2 = register_policy(settings, tiny_fixed_policy_dir(tmp / "v2", eos_prob=0.3, seed=3), uri, base)
    with pytest.raises(GateError, match="has no evaluation: run `flywheel evaluate"):
        promote(settings, "flywheel-policy", v2)
    evaluate_challenger(settings, "flywheel-policy", v2, dataset=uri, recipe=gate(**LOOSE))
    rec = promote(settings, "flywheel-policy", v2, gate=gate(**LOOSE), actor="alice")
    assert (rec.action, rec.previous, rec.champion) == ("promote", "1", v2)
    assert alias_version(client, "flywheel-policy", "champion") == v2
    assert rec.metrics["challenger"]["no_eos_share"] is not None and rec.metrics["checks"]
    # the same evaluation cannot promote again, nor after the champion changed under it
    assert promote(settings, "flywheel-policy", v2, gate=gate(**LOOSE)).action == "refuse"
    rb = rollback(settings, "flywheel-policy", actor="bob", note="users complain")
    assert (rb.action, rb.previous, rb.champion) == ("rollback", v2, "1")
    assert alias_version(client, "flywheel-policy", "champion") == "1"
    forced = promote(settings, "flywheel-policy", v2, gate=gate(), actor="carol", force=True, note="hotfix")
    assert forced.action == "force" and forced.reasons[0] == "forced by carol: hotfix"

    # a new process reads the same history back from the lake storage
    env = {"FLYWHEEL_HOME": str(settings.home), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "history", "--model", "flywheel-policy"],
                         capture_output=True, text=True, env=env, check=True).stdout
    lines = [ln for ln in out.splitlines() if not ln.startswith("    ")]
    assert [ln.split()[2] for ln in lines] == ["bootstrap", "promote", "refuse", "rollback", "force"]
    assert "by alice" in lines[1] and "by bob" in lines[3] and "- rolled back from version 2 to 1: users complain" in out
    assert "by carol" in lines[4] and "champion 1 -> 2" in lines[4]


def test_the_served_policy_follows_the_alias_by_polling_and_sends_a_canary_share_to_the_challenger(registry):
    from serving.champion import ChampionPolicy
    from training.registry import promote

    settings, uri, base, tmp = registry
    v2 = register_policy(settings, tiny_fixed_policy_dir(tmp / "v2", eos_prob=0.3, seed=3), uri, base)  # @challenger
    canary = ChampionPolicy(settings, canary_share=0.25).start()
    canary._rng.seed(0)
    picked = [canary.pick().version for _ in range(400)]
    assert set(picked) == {"flywheel-policy/1", "flywheel-policy/2"}
    assert 0.18 < picked.count("flywheel-policy/2") / 400 < 0.32
    reply = canary.generate([{"role": "user", "content": "hello"}], 4, seed=0)
    assert reply.model_version in {"flywheel-policy/1", "flywheel-policy/2"}

    follower = ChampionPolicy(settings, poll_s=0.2).start()
    try:
        assert follower.versions() == {"champion": "flywheel-policy/1", "challenger": None}
        promote(settings, "flywheel-policy", v2, force=True, actor="test")
        deadline = time.monotonic() + 20
        while follower.version != "flywheel-policy/2" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert follower.version == "flywheel-policy/2" and follower.swaps == 2
    finally:
        follower.close()
    with pytest.raises(ValueError, match="canary_share"):
        ChampionPolicy(settings, canary_share=1.5)


def test_reward_models_go_through_the_same_gate_and_history(registry):
    import mlflow
    from mlflow import MlflowClient

    from training.evaluation import evaluate_challenger
    from training.registry import alias_version, promote, rollback
    from training.report import RewardMetrics
    from training.reward.train import log_and_register
    from training.tracking import use_tracking

    settings, uri, _base, tmp = registry
    client = MlflowClient(settings.mlflow.tracking_uri)
    first = evaluate_challenger(settings, "flywheel-reward", "1", dataset=uri, recipe=gate())
    assert isinstance(first.challenger, RewardMetrics) and first.champion is None
    assert first.challenger.accuracy is not None and 0 <= first.challenger.accuracy <= 1
    assert promote(settings, "flywheel-reward", "1", gate=gate(min_rm_accuracy=1.01)).action == "refuse"
    # the tiny random model is judged on the trusted labelers' audit set too (configs/probes/audit.yaml)
    assert {"concise", "no_flattery", "says_something"} <= set(first.challenger.audit)
    assert {"audit/concise", "audit_pairs/concise"} <= set(first.as_dict()["challenger"])  # the logged layout
    ok = promote(settings, "flywheel-reward", "1", gate=gate(min_rm_accuracy=0.0, max_length_correlation=1.0,
                                                             min_audit_accuracy=0.0))
    assert ok.action == "promote", ok.reasons

    RewardModel.from_backbone(tiny_encoder_dir(tmp / "rm2-bb", seed=5), max_length=64).save(tmp / "reward2")
    use_tracking(settings, "flywheel-reward")
    with mlflow.start_run() as run:
        v2 = log_and_register(tmp / "reward2", run.info.run_id, "0123456789abcdef", {})
    report = evaluate_challenger(settings, "flywheel-reward", v2, dataset=uri, recipe=gate())
    assert report.champion_version == "1" and isinstance(report.champion, RewardMetrics)
    assert report.champion.accuracy is not None
    rec = promote(settings, "flywheel-reward", v2, gate=gate(min_rm_accuracy=0.0, max_accuracy_drop=1.0,
                                                             max_length_correlation=1.0, min_audit_accuracy=0.0))
    assert (rec.action, rec.previous, rec.champion) == ("promote", "1", v2)
    assert rollback(settings, "flywheel-reward").champion == "1"
    assert alias_version(client, "flywheel-reward", "champion") == "1"


def test_a_missing_alias_is_none_and_an_unreachable_registry_is_an_error(tmp_path, monkeypatch):
    """"No champion" (which the loop answers by bootstrapping one) and "the registry cannot say" are different."""
    from mlflow import MlflowClient

    from training.registry import RegistryUnavailable, alias_version

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert alias_version(client, "flywheel-policy", "champion") is None  # no such model
    client.create_registered_model("flywheel-policy")
    assert alias_version(client, "flywheel-policy", "champion") is None  # no such alias
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(RegistryUnavailable, match="cannot read flywheel-policy@champion"):
        alias_version(MlflowClient("http://127.0.0.1:9"), "flywheel-policy", "champion")
