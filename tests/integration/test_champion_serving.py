"""Serving follows the champion: promote and roll back over the admin API while chats keep coming.

Real parts: the Tansu broker, the consumer writing the lake, the API under uvicorn, MLflow (SQLite) with
tiny policies registered as versions 1 and 2, the gate on a logged evaluation. Every chat must succeed;
chats that start after the promotion answered must come from version 2, after the rollback from version 1;
every turn in the lake carries the version its response said."""

from __future__ import annotations

import io
import secrets
import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest

from flywheel.settings import ApiKey, hash_api_key
from flywheel.storage import open_storage
from ingest.lake import list_files
from serving.app import create_app
from serving.champion import ChampionPolicy
from serving.server import BackgroundServer
from tests.integration.helpers import consumer_thread
from tests.tiny import tiny_encoder_dir, tiny_fixed_policy_dir, tiny_pairs, write_dataset
from tests.unit.test_registry import LOOSE, register_policy
from training.reward.model import RewardModel


def lake_turn_versions(settings) -> dict[str, str]:
    storage = open_storage(settings.lake.uri, settings.lake)
    out = {}
    for key in list_files(storage, "turn"):
        table = pq.read_table(io.BytesIO(storage.get_bytes(key)), columns=["response_id", "model_version"])
        out.update({r["response_id"]: r["model_version"] for r in table.to_pylist()})
    return out


@pytest.fixture
def served(settings, tmp_path):
    import mlflow
    import yaml

    from flywheel.app.cli import main
    from training.config import GateRecipe
    from training.evaluation import evaluate_challenger
    from training.registry import bootstrap_policy
    from training.reward.train import log_and_register
    from training.tracking import use_tracking

    user, admin = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    settings.api.keys = [ApiKey(name="app", sha256=hash_api_key(user)),
                         ApiKey(name="ops", sha256=hash_api_key(admin), admin=True)]
    gate_file = tmp_path / "gate-loose.yaml"
    gate_file.write_text(yaml.safe_dump({"kind": "gate", "eval_prompts": 8, "max_new_tokens": 16, **LOOSE}))
    settings.api.gate_recipe = str(gate_file)
    uri = write_dataset(tmp_path / "lake-ds", tiny_pairs(40))
    RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "rm-bb"), max_length=64).save(tmp_path / "reward")
    use_tracking(settings, "flywheel-reward")
    with mlflow.start_run() as run:
        log_and_register(tmp_path / "reward", run.info.run_id, "0123456789abcdef", {})
    base = tiny_fixed_policy_dir(tmp_path / "v1", eos_prob=0.25)
    assert bootstrap_policy(settings, base=base) == "1"
    v2 = register_policy(settings, tiny_fixed_policy_dir(tmp_path / "v2", eos_prob=0.3, seed=3), uri, base)
    evaluate_challenger(settings, "flywheel-policy", v2, dataset=uri,
                        recipe=GateRecipe(eval_prompts=8, max_new_tokens=16, **LOOSE))
    policy = ChampionPolicy(settings, poll_s=0).start()
    with consumer_thread(settings), BackgroundServer(create_app(settings, policy=policy), port=_port()) as server:
        yield server.url, user, admin, v2, main
    policy.close()


def _port() -> int:
    from flywheel.app.stack import free_port

    return free_port()


def test_promotion_and_rollback_swap_the_served_model_without_dropping_a_request(settings, served):
    url, user, admin, v2, _main = served
    results: list[tuple[float, int, str | None, str | None]] = []  # (start, status, model_version, response_id)
    stop = threading.Event()
    lock = threading.Lock()

    def load(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {user}"}, timeout=60) as c:
            n = 0
            while not stop.is_set():
                started = time.monotonic()
                r = c.post("/v1/chat", json={"user_id": f"u{i}", "messages": [{"role": "user", "content": "hello world"}],
                                             "max_new_tokens": 8, "seed": n})
                body = r.json()
                with lock:
                    results.append((started, r.status_code, body.get("model_version"), body.get("response_id")))
                n += 1

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    with httpx.Client(base_url=url, timeout=60) as c:
        as_user = {"Authorization": f"Bearer {user}"}
        as_admin = {"Authorization": f"Bearer {admin}"}
        time.sleep(1.5)
        for path in ("/v1/admin/promote", "/v1/admin/rollback", "/v1/admin/reload"):
            r = c.post(path, headers=as_user, json={"version": v2})
            assert r.status_code == 403 and "not an admin key" in r.json()["message"], path
        assert c.get("/v1/admin/history", headers=as_user).status_code == 403
        r = c.post("/v1/admin/promote", headers=as_admin, json={"version": "99"})
        assert r.status_code == 404 and r.json()["error"] == "unknown_version"

        r = c.post("/v1/admin/promote", headers=as_admin, json={"version": v2, "note": "gate passed"})
        assert r.status_code == 200, r.text
        assert r.json()["record"]["action"] == "promote" and r.json()["serving"]["champion"] == "flywheel-policy/2"
        promoted_at = time.monotonic()
        time.sleep(1.5)
        rolled_at = time.monotonic()
        r = c.post("/v1/admin/rollback", headers=as_admin, json={"note": "canary looked bad"})
        assert r.status_code == 200 and r.json()["serving"]["champion"] == "flywheel-policy/1", r.text
        back_at = time.monotonic()
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(60)
        history = c.get("/v1/admin/history", headers=as_admin, params={"model": "flywheel-policy"}).json()["records"]

    assert results and all(status == 200 for _, status, _, _ in results), {s for _, s, _, _ in results}
    during = [v for start, _, v, _ in results if promoted_at < start < rolled_at]
    after = [v for start, _, v, _ in results if start > back_at]
    before = [v for start, _, v, _ in results if start < promoted_at - 1.0]
    assert before and set(before) == {"flywheel-policy/1"}
    assert during and set(during) == {"flywheel-policy/2"}
    assert after and set(after) == {"flywheel-policy/1"}
    assert [(h["action"], h["actor"]) for h in history] == [("bootstrap", "flywheel"), ("promote", "api:ops"),
                                                            ("rollback", "api:ops")]
    assert history[2]["reasons"] == ["rolled back from version 2 to 1: canary looked bad"]

    said = {rid: v for _, _, v, rid in results}
    deadline = time.monotonic() + 60
    in_lake = lake_turn_versions(settings)
    while not set(said) <= set(in_lake) and time.monotonic() < deadline:
        time.sleep(0.5)
        in_lake = lake_turn_versions(settings)
    assert {rid: in_lake.get(rid) for rid in said} == said
