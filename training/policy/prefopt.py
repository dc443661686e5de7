"""DPO and KTO through TRL: the cheaper alternatives to PPO, selected by a recipe's ``kind``.

- ``dpo`` (Rafailov et al. 2023) trains on the curated ``pairs`` (train split): no reward model, no sampling.
- ``kto`` (Ethayarajh et al. 2024) trains on the ``unpaired`` set (prompt, completion, thumbs-style label),
  which uses feedback that never formed a pair.

Rows are given to TRL in its conversational format (the prompt as the user's message, the answers as the
assistant's), so TRL renders them with the model's chat template: the same tokens PPO samples from and
serving answers with, not a plain string the model never sees in production.

The reference model is an explicit frozen copy (TRL would otherwise try to fetch one by name). TRL's
``report_to`` is off; a callback forwards its logs into our MLflow run, which carries the same tags and
artifacts as a PPO run, and the result is registered as ``flywheel-policy@challenger``.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch

from flywheel.settings import Settings
from pipelines.dataset import open_dataset
from training.config import PreferenceOptRecipe
from training.generation import load_causal_lm
from training.runs import PolicyResult, tracked_run
from training.tracking import POLICY_MODEL, use_tracking


def conversational(table: Any) -> Any:
    """Preference rows in TRL's conversational format: ``prompt`` as a one-message user turn, each answer
    column (``chosen``/``rejected`` or ``completion``) as an assistant turn."""
    out = table.copy()
    out["prompt"] = [[{"role": "user", "content": p}] for p in table["prompt"]]
    for col in ("chosen", "rejected", "completion"):
        if col in out:
            out[col] = [[{"role": "assistant", "content": a}] for a in table[col]]
    return out


def train_preference_opt(settings: Settings, recipe: PreferenceOptRecipe, dataset_ref: str, *,
                         experiment: str = POLICY_MODEL, register_model: bool = True) -> dict[str, Any]:
    import mlflow
    from datasets import Dataset
    from transformers import TrainerCallback

    from training.policy.ppo import log_and_register_policy

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    ds = open_dataset(dataset_ref, settings)
    if recipe.kind == "dpo":
        table = ds.table("pairs")
        table = table[table["split"] == "train"][["prompt", "chosen", "rejected"]]
    else:
        table = ds.table("unpaired")
        table = table[table["split"] == "train"][["prompt", "completion", "label"]]
    if table.empty:
        raise ValueError(f"dataset {dataset_ref}: no training rows for {recipe.kind}")
    table = conversational(table)
    lm, tok = load_causal_lm(recipe.policy)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ref = copy.deepcopy(lm).eval().requires_grad_(False)
    peft_config = None
    if recipe.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, target_modules=list(recipe.lora_targets),
                                 task_type="CAUSAL_LM")
        ref = None  # with adapters, TRL uses the base weights as the reference

    out_dir = Path(tempfile.mkdtemp(prefix=f"{recipe.kind}-"))
    common = dict(output_dir=str(out_dir / "trainer"), per_device_train_batch_size=recipe.batch_size,
                  learning_rate=recipe.lr, max_steps=recipe.max_steps, logging_steps=1, save_strategy="no",
                  report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, seed=recipe.seed,
                  beta=recipe.beta, max_length=recipe.max_length)

    class _ToMlflow(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **_: Any) -> None:
            if logs:
                mlflow.log_metrics({f"{recipe.kind}/{k}": float(v) for k, v in logs.items()
                                    if isinstance(v, (int, float))}, step=state.global_step)

    use_tracking(settings, experiment)
    with tracked_run(recipe, kind=recipe.kind, dataset=ds) as run:
        if recipe.kind == "dpo":
            from trl import DPOConfig, DPOTrainer

            trainer = DPOTrainer(model=lm, ref_model=ref, args=DPOConfig(**common),
                                 train_dataset=Dataset.from_pandas(table, preserve_index=False),
                                 processing_class=tok, peft_config=peft_config, callbacks=[_ToMlflow()])
        else:
            from trl import KTOConfig, KTOTrainer

            trainer = KTOTrainer(model=lm, ref_model=ref, args=KTOConfig(**common),
                                 train_dataset=Dataset.from_pandas(table, preserve_index=False),
                                 processing_class=tok, peft_config=peft_config, callbacks=[_ToMlflow()])
        result = trainer.train()
        model = trainer.model
        if recipe.lora:
            model = model.merge_and_unload()
        policy_dir = out_dir / "policy"
        model.save_pretrained(policy_dir)
        tok.save_pretrained(policy_dir)
        version = log_and_register_policy(policy_dir, run.info.run_id, ds.version, "none",
                                          {"train_loss": float(result.training_loss)},
                                          reference=recipe.policy) if register_model else None
        return PolicyResult(recipe.kind, run.info.run_id, version, result.global_step, str(policy_dir),
                            {"train_loss": float(result.training_loss)})
