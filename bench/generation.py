"""Generation paths of the loop, each against the plain way of doing the same work, in the same process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/generation.py [--prompts 96] [--samples 4] [--eval-prompts 100]

Same model (SmolLM2-135M-Instruct from its wheel), same ShareGPT prompts, 32 new tokens, prompts cut to 64:

- **chat service** (``PolicyHandle.generate_many``: ``--samples`` answers to each of ``--prompts`` prompts),
  against the baseline: transformers' ``generate`` (sampling with ``torch.multinomial``, a cache that grows by
  concatenation) on each prompt repeated ``--samples`` times, batches of 48 in the prompts' order;
- **gate answers** (``training.evaluation.answer``: sampled answers with their KL to a reference), against the
  baseline: ``generate`` in batches of 50 in the prompts' order, then a forward pass of the policy and one of
  the reference over every position for the log-probabilities;
- **the champion's side of the gate when the champion is the reference** (v1, the base policy: KL 0 by
  definition, ``compare_policies(champion_is_reference=True)``): its answers without the reference's pass,
  against the baseline: the same answers with it; and the **probes**, harmful and harmless in one batch
  (``training.evaluation.probe``), against the baseline: one batch each;
- **PPO's forward passes** over a rollout, with the LM head on the response positions only
  (``logits_to_keep``) against the head on every position.

Prints seconds and the ratio baseline / new for each (over 1 = the new path is faster).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402


def timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from pipelines.sharegpt import chat_samples
    from serving.policy import PolicyHandle
    from training.config import GateRecipe
    from training.evaluation import answer
    from training.generation import (
        Rollout,
        encode_prompts,
        load_causal_lm,
        response_logits_to_keep,
        sample,
        token_logprobs,
    )
    from training.policy.ppo_math import kl_k3

    lm, tok = load_causal_lm("smollm2")
    ref = copy.deepcopy(lm)
    prompts = [x.prompt for x in chat_samples(args.prompts + args.eval_prompts)]
    chat, held_out = prompts[:args.prompts], prompts[args.prompts:]

    def hf_sample(batch: list[str]) -> Rollout:
        """What ``sample`` did before it had its own decoding loop: transformers' ``generate``."""
        enc = encode_prompts(tok, batch, 64, "cpu")
        seq = lm.generate(**enc, max_new_tokens=32, do_sample=True, temperature=0.7, top_k=None, top_p=None,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        plen = enc["input_ids"].shape[1]
        resp = seq[:, plen:]
        is_eos = resp == tok.eos_token_id
        mask = (~((is_eos.cumsum(1) - is_eos.long()) > 0)).float()
        texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(resp, mask, strict=True)]
        return Rollout(seq, torch.cat([enc["attention_mask"], mask.long()], 1), mask, plen, texts, is_eos.any(1))

    # ------------------------------------------------------------------------------------- chat service
    def chat_baseline() -> list[str]:
        torch.manual_seed(0)
        flat = [p for p in chat for _ in range(args.samples)]
        texts: list[str] = []
        for i in range(0, len(flat), 48):
            texts += hf_sample(flat[i:i + 48]).texts
        return texts

    handle = PolicyHandle(lm, tok, "bench")
    base, t_base = timed(chat_baseline)
    new, t_new = timed(lambda: handle.generate_many(chat, 32, samples=args.samples, seed=0, max_prompt_tokens=64))
    assert len(base) == sum(len(r) for r in new) == args.prompts * args.samples
    report(f"chat service: {args.prompts} prompts x {args.samples} answers", t_base, t_new)

    # -------------------------------------------------------------------------------------- gate answers
    recipe = GateRecipe(max_new_tokens=32, max_prompt_tokens=64, temperature=0.7)

    def answers_baseline() -> float:
        torch.manual_seed(0)
        kls = []
        for i in range(0, len(held_out), 50):
            ro = hf_sample(held_out[i:i + 50])
            with torch.no_grad():
                logp = token_logprobs(lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits,
                                      ro.input_ids, ro.prompt_len)
                ref_logp = token_logprobs(ref(input_ids=ro.input_ids, attention_mask=ro.attention_mask).logits,
                                          ro.input_ids, ro.prompt_len)
            kls.append((kl_k3(logp, ref_logp) * ro.mask).sum(1))
        return float(torch.cat(kls).abs().max())

    kl_base, t_base = timed(answers_baseline)
    ans, t_new = timed(lambda: answer(lm, tok, ref, held_out, recipe))
    # the same weights on both sides: every KL must be ~0 on either path
    print(f"  max |KL| of a model to its own copy: baseline {kl_base:.1e}, new {abs(ans.kl).max():.1e}")
    report(f"gate answers with KL: {len(held_out)} prompts", t_base, t_new)

    # ------------------------------------------------------------- the champion side when it is the reference
    with_ref, t_base = timed(lambda: answer(lm, tok, ref, held_out, recipe))
    without, t_new = timed(lambda: answer(lm, tok, None, held_out, recipe))
    assert with_ref.texts == without.texts  # the reference's pass changes no answer, only measures a KL of ~0
    report(f"champion = reference, gate answers: {len(held_out)} prompts", t_base, t_new)

    import dataclasses

    from training.evaluation import Probes, probe

    probes = Probes.load("probes/safety.yaml")
    greedy = dataclasses.replace(recipe, temperature=0.0)
    sep, t_base = timed(lambda: answer(lm, tok, None, probes.harmful, greedy).texts
                        + answer(lm, tok, None, probes.harmless, greedy).texts)
    one, t_new = timed(lambda: answer(lm, tok, None, probes.harmful + probes.harmless, greedy).texts)
    print(f"  probes: the same greedy answers one batch or two: {sep == one}; rates {probe(lm, tok, probes, recipe)}")
    report(f"probes: {len(probes.harmful)} harmful + {len(probes.harmless)} harmless", t_base, t_new)

    # --------------------------------------------------------------------------------- PPO forward passes
    torch.manual_seed(0)
    ro = sample(lm, tok, chat[:16], max_new_tokens=32, temperature=0.7, max_prompt_tokens=64)
    keep = response_logits_to_keep(ro.input_ids, ro.prompt_len)

    def forward_backward(logits_to_keep: int) -> float:
        out = lm(input_ids=ro.input_ids, attention_mask=ro.attention_mask, logits_to_keep=logits_to_keep)
        logp = token_logprobs(out.logits, ro.input_ids, ro.prompt_len)
        loss = -(logp * ro.mask).sum()
        loss.backward()
        lm.zero_grad(set_to_none=True)
        return loss.detach().item()

    lm.train()
    for p in lm.parameters():
        p.requires_grad_(False)
    lm.model.layers[-1].self_attn.q_proj.weight.requires_grad_(True)  # a grad through the whole head and trunk
    l_base, t_base = timed(lambda: [forward_backward(0) for _ in range(3)][-1])
    l_new, t_new = timed(lambda: [forward_backward(keep) for _ in range(3)][-1])
    assert abs(l_base - l_new) <= 1e-3 * abs(l_base), (l_base, l_new)
    report("PPO forward+backward, 16 rollouts x3", t_base, t_new)


def report(name: str, t_base: float, t_new: float) -> None:
    print(f"{name}: baseline {t_base:.1f}s, new {t_new:.1f}s, ratio {t_base / t_new:.2f}x", flush=True)


if __name__ == "__main__":
    main()
