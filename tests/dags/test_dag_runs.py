"""`airflow dags test` of every DAG, end to end on embedded defaults (SQLite metadata DB, local lake, MLflow on
SQLite) with tiny models: curate (twice: the same interval gives the same dataset version) -> reward model
(trained, gated, promoted) -> policy (PPO from the champion, with the champion reward model) -> promote.
And a failing task: its summary is in the task log and is POSTed to the configured webhook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from flywheel.settings import Settings
from tests.tiny import tiny_encoder_dir, tiny_fixed_policy_dir
from tests.unit.test_registry import LOOSE

NOW = datetime(2026, 11, 20, 10, 50, tzinfo=UTC)  # the simulated traffic spans [09:55, ~10:55)
RUN = "2026-11-20T11:00:00+00:00"


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    from flywheel.app.orchestrator import airflow_env, prepare
    from flywheel.app.simulate import SimConfig, simulate_events
    from pipelines.sharegpt import chat_samples
    from tests.tiny import write_events_to_lake
    from training.registry import bootstrap_policy

    tmp = tmp_path_factory.mktemp("dags")
    settings = Settings(home=tmp / "home")
    sim = simulate_events(chat_samples(60), SimConfig(users=40, seed=1, prompts=40), now=NOW)
    assert write_events_to_lake(settings, sim.events) == len(sim.events)
    recipes = {
        "reward.yaml": {"kind": "reward", "name": "reward-tiny", "backbone": tiny_encoder_dir(tmp / "rm-bb"),
                        "max_length": 64, "batch_size": 8, "max_steps": 3, "threads": 1, "checkpoint_every": 100},
        "ppo.yaml": {"kind": "ppo", "name": "ppo-tiny", "prompts": 8, "eval_prompts": 4, "max_new_tokens": 8,
                     "rollout_batch": 4, "minibatch": 2, "ppo_epochs": 1, "steps": 2, "lr": 1e-3, "threads": 1},
        "gate.yaml": {"kind": "gate", "eval_prompts": 4, "max_new_tokens": 8, **LOOSE},
    }
    for name, body in recipes.items():
        (tmp / name).write_text(yaml.safe_dump(body))
    assert bootstrap_policy(settings, base=tiny_fixed_policy_dir(tmp / "base", eos_prob=0.25)) == "1"
    env = {**airflow_env(settings), "OMP_NUM_THREADS": "1", "FLYWHEEL_LOOP__REWARD_RECIPE": str(tmp / "reward.yaml"),
           "FLYWHEEL_LOOP__POLICY_RECIPE": str(tmp / "ppo.yaml"), "FLYWHEEL_LOOP__GATE_RECIPE": str(tmp / "gate.yaml"),
           "FLYWHEEL_LOOP__MIN_NEW_PAIRS": "1", "FLYWHEEL_LOOP__TRAIN_WINDOW_H": "24"}
    os.environ.update({k: env[k] for k in ("AIRFLOW_HOME",)})
    prepare(settings)
    return settings, env, tmp


def dags_test(env: dict[str, str], dag_id: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["airflow", "dags", "test", dag_id, RUN], env={**env, **(extra or {})}, capture_output=True,
                          text=True, timeout=600, cwd=env["AIRFLOW_HOME"])


def test_every_dag_runs_end_to_end_and_curation_is_idempotent(airflow):
    from mlflow import MlflowClient

    from training.registry import AuditLog, alias_version

    settings, env, _tmp = airflow
    versions = []
    for _ in range(2):
        out = dags_test(env, "flywheel_curate")
        assert out.returncode == 0 and "DagRun Finished" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
        found = re.findall(r"curated \[2026-11-20T10:00:00\+00:00, 2026-11-20T11:00:00\+00:00\): dataset ([0-9a-f]{16}), "
                           r"(\d+) feedback events read .* held back (\d+) .*?, (\d+) pairs", out.stdout)
        assert found, out.stdout[-3000:]
        versions.append(found[0])
    assert versions[0] == versions[1] and int(versions[0][1]) > 0 and int(versions[0][3]) > 0

    out = dags_test(env, "flywheel_reward")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert re.search(r"\d+ new pairs since \(minimum 1\): retrain", out.stdout), out.stdout[-3000:]
    assert "flywheel-reward version 1 vs champion None: PROMOTE" in out.stdout, out.stdout[-3000:]
    client = MlflowClient(settings.mlflow.tracking_uri)
    assert alias_version(client, "flywheel-reward", "champion") == "1"

    out = dags_test(env, "flywheel_policy")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert re.search(r"policy version 2 \(ppo-tiny from models:/flywheel-policy/1, reward model 1\)", out.stdout)
    out = dags_test(env, "flywheel_promote")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "flywheel-policy version 2 vs champion 1: PROMOTE" in out.stdout, out.stdout[-3000:]
    assert alias_version(client, "flywheel-policy", "champion") == "2"
    mv = client.get_model_version("flywheel-policy", "2")
    assert mv.tags["reward_model_version"] == "1" and mv.tags["start_policy"] == "models:/flywheel-policy/1"
    history = [(r.model, r.action, r.actor) for r in AuditLog.from_settings(settings).history()]
    assert ("flywheel-reward", "promote", "flywheel-loop") in history and ("flywheel-policy", "promote", "flywheel-loop") in history

    # the reward DAG again, same interval: nothing new to train, no second version
    out = dags_test(env, "flywheel_reward", {"FLYWHEEL_LOOP__MIN_NEW_PAIRS": "100000"})
    assert out.returncode == 0 and ": skip" in out.stdout, out.stdout[-3000:]
    assert len(client.search_model_versions("name='flywheel-reward'")) == 1


def test_a_failing_task_logs_its_summary_and_posts_it_to_the_webhook(airflow):
    _settings, env, tmp = airflow
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = dags_test(env, "flywheel_curate", {
            "FLYWHEEL_DAG_RETRIES": "0", "FLYWHEEL_CURATION__BLOCKLIST_FILE": str(Path(tmp) / "missing-blocklist.txt"),
            "FLYWHEEL_LOOP__WEBHOOK_URL": f"http://127.0.0.1:{server.server_port}/hook"})
    finally:
        server.shutdown()
    text = out.stdout + out.stderr
    assert "FLYWHEEL TASK FAILED: flywheel_curate.curate" in text and "FileNotFoundError" in text, text[-3000:]
    assert len(received) == 1
    hook = received[0]
    assert hook["dag_id"] == "flywheel_curate" and hook["task_id"] == "curate" and hook["try_number"] == 1
    assert hook["error"].startswith("FileNotFoundError") and "missing-blocklist.txt" in hook["error"]
    assert hook["data_interval"] == ["2026-11-20 10:00:00+00:00", "2026-11-20 11:00:00+00:00"]
    assert hook["text"].startswith("FLYWHEEL TASK FAILED")
