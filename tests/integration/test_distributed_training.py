"""Data-parallel training under torchrun, on CPU with the gloo backend (the same code runs NCCL on GPUs).

- The reward model trained by two processes ends with the parameters a single process reaches on the same
  recipe (each rank takes half of every batch and DDP averages the gradients): data parallelism changes the
  speed, not the result. Only rank 0 tracks: one MLflow run, one registered version.
- PPO under two processes trains, logs one run and registers one challenger.
- The reductions the PPO update relies on (gather in global-batch order, whitening over all ranks)
  equal the single-process computation on the concatenated batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_encoder_dir, tiny_pairs, tiny_policy_dir, write_dataset
from training.reward.model import RewardModel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]


def _flywheel(args: list[str], home: Path, nproc: int = 1) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 \
        else [sys.executable]
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([*launcher, "-m", "flywheel.app.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    start = out.stdout.index("{")  # one JSON document: rank 0's (the other ranks print nothing)
    return json.loads(out.stdout[start:])


def test_two_processes_train_the_reward_model_to_the_single_process_result(tmp_path):
    backbone = tiny_encoder_dir(tmp_path / "backbone", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    uri = write_dataset(tmp_path / "lake", tiny_pairs(80))
    args = ["train", "reward", "--dataset", uri, "--recipe", "reward-minilm.yaml", "--set", f"backbone={backbone}",
            "--set", "max_steps=6", "--set", "batch_size=8", "--set", "max_length=32", "--set", "threads=1",
            "--set", "device=cpu", "--set", "lr=1e-3", "--set", "head_lr=1e-2", "--set", "log_every=2"]
    single = _flywheel(args, tmp_path / "one")
    ddp = _flywheel(args, tmp_path / "two", nproc=2)
    assert single["steps"] == ddp["steps"] == 6 and ddp["version"] == "1"

    import mlflow
    from mlflow import MlflowClient

    from flywheel.settings import Settings
    from training.reward.train import load_registered_reward

    models = {}
    for home, res in (("one", single), ("two", ddp)):
        client = MlflowClient(Settings(home=tmp_path / home).mlflow.tracking_uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        # the model and its cross-fitted judge (reward-minilm.yaml has judge_fold), one run each, on rank 0 only
        assert sorted(r.data.tags["flywheel.recipe"] for r in runs) == ["reward-minilm", "reward-minilm-judge"]
        run = client.get_run(res["run_id"])
        assert [m.step for m in client.get_metric_history(res["run_id"], "train/loss")] == [2, 4, 6]
        if home == "two":
            assert run.data.params["distributed.world_size"] == "2"
        mv = client.get_model_version("flywheel-reward", res["version"])
        assert mv.run_id == res["run_id"]
        mlflow.set_tracking_uri(Settings(home=tmp_path / home).mlflow.tracking_uri)
        models[home] = load_registered_reward(f"models:/flywheel-reward/{res['version']}")
    untrained = RewardModel.from_backbone(backbone, max_length=32).backbone.state_dict()
    one, two = models["one"].state_dict(), models["two"].state_dict()
    moved = max(float((one[k] - untrained[k.removeprefix("backbone.")]).abs().max()) for k in one if k.startswith("backbone."))
    assert moved > 1e-3, "training did not move the backbone"
    gap = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert gap < 1e-4, f"2-process parameters differ from the single-process run's by {gap}"
    assert abs(single["eval/accuracy"] - ddp["eval/accuracy"]) < 1e-9


def test_two_processes_train_ppo_and_register_one_challenger(tmp_path):
    reward = RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "rm-backbone"), max_length=64)
    reward.save(tmp_path / "reward")
    policy = tiny_policy_dir(tmp_path / "policy")
    uri = write_dataset(tmp_path / "lake", tiny_pairs(40))
    sets = dict(policy=policy, reward_model=str(tmp_path / "reward"), prompts=16, eval_prompts=4, max_new_tokens=8,
                rollout_batch=4, minibatch=2, ppo_epochs=2, steps=3, lr=1e-3, value_lr=1e-3, threads=1, device="cpu")
    args = ["train", "policy", "--dataset", uri, "--recipe", "policy-ppo.yaml"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    res = _flywheel(args, tmp_path / "home", nproc=2)
    assert res["steps"] == 3 and res["version"] == "1"

    from mlflow import MlflowClient

    from flywheel.settings import Settings

    client = MlflowClient(Settings(home=tmp_path / "home").mlflow.tracking_uri)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1
    run = client.get_run(res["run_id"])
    assert run.data.params["distributed.world_size"] == "2"
    for key in ("ppo/reward", "ppo/kl", "ppo/beta", "ppo/entropy", "ppo/tokens"):
        history = client.get_metric_history(res["run_id"], key)
        assert [m.step for m in history] == [1, 2, 3] and all(m.value == m.value for m in history), key
    assert client.get_model_version_by_alias("flywheel-policy", "challenger").run_id == res["run_id"]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(res["policy_dir"]).state_dict()
    start = AutoModelForCausalLM.from_pretrained(policy).state_dict()
    assert any(not torch.allclose(trained[k], start[k]) for k in start), "PPO did not move the policy"


def _reductions_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    from training.config import PPORecipe
    from training.distributed import Dist
    from training.policy.ppo import PPOTrainer
    from training.policy.ppo_math import whiten

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dist = Dist(rank, world, rank, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.3).float()
    trainer = PPOTrainer.__new__(PPOTrainer)  # only the reductions: no model needed
    trainer.dist = dist
    trainer.r = PPORecipe(reward_norm="batch", reward_clip=100.0)
    result = {
        "gathered": dist.gather(torch.arange(8.0)[rank::world]).tolist(),
        "whitened_tokens": whiten(dist.shard(x), dist.shard(mask), all_sum=dist.sum).tolist(),
        "normalised": trainer.normalise(dist.shard(x[:, 0])).tolist(),
        "mean": float(dist.mean(torch.tensor(float(rank)))),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    tdist.destroy_process_group()


def test_reductions_over_ranks_equal_the_single_process_computation(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from training.policy.ppo_math import whiten

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_reductions_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(8, 5, generator=g), (torch.rand(8, 5, generator=g) > 0.3).float()
    full_tokens, full_scores = whiten(x, mask), whiten(x[:, 0])
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["gathered"] == list(range(8))
        assert got["mean"] == 0.5
        mine = mask[rank::2].bool()
        assert torch.allclose(torch.tensor(got["whitened_tokens"])[mine], full_tokens[rank::2][mine], atol=1e-5)
        assert torch.allclose(torch.tensor(got["normalised"]), full_scores[rank::2], atol=1e-5)


def test_a_batch_that_cannot_be_shared_out_equally_is_refused_with_the_reason():
    from training.distributed import check_divisible, pick_device

    check_divisible("rollout_batch", 8, 4)
    with pytest.raises(ValueError, match="rollout_batch=6 must be a multiple of the number of processes \\(4\\)"):
        check_divisible("rollout_batch", 6, 4)
    with pytest.raises(ValueError, match="device must be one of"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        assert pick_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="asks for device: cuda, but torch sees no CUDA device"):
            pick_device("cuda")
