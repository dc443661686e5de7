"""``flywheel demo``: the whole loop on one machine, and the evidence that it works.

1. A fresh run directory (``<home>/demo/<run>``) with its own embedded stack: Tansu broker, lake, MLflow.
2. The base policy, SmolLM2-135M-Instruct, is registered as ``flywheel-policy`` v1 @champion; the API serves
   whatever ``@champion`` points to (``ChampionPolicy``, polling the alias), the consumer writes the lake.
3. Each cycle is one simulated hour of traffic. The chat service answers the users' prompts with the serving
   champion (``model_samples`` sampled answers a prompt, generated in batches), beside a few fixed answer
   styles from ShareGPT; simulated users (honest ones with a hidden preference, plus adversaries) rate them
   and talk to the real HTTP API (``/v1/turns``, ``/v1/feedback/batch`` and a few live
   ``/v1/chat`` calls answered by the serving champion), then the loop's steps run on that hour, exactly
   as the Airflow DAGs call them (:mod:`flywheel.app.loop`): curate -> train the reward model -> reward-model
   gate -> PPO from the champion against the champion reward model -> evaluate against the champion on
   held-out ShareGPT prompts -> gate -> promote; the API picks the new champion up.
4. A report (``report.md`` + ``report.png``) with, per cycle, what came in, what was held back and why,
   pairs and agreement, the reward model's accuracy against the hidden preference, the challenger's win
   rate against the champion on the hidden preference (and as the judge saw it), KL, length, and the
   gate's decision with its reasons; at the end the final champion against v1 on the hidden preference.

``--scenario reward-hacking``: users click for the shortest answer whatever it says (a proxy the hidden
preference disagrees with below a few words); the reward model learns "shorter is better" and the gate
must refuse it, and with it every policy that would have been trained against it.

The hidden preference is known only to the simulation and this report: nothing in the loop reads it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from flywheel.app.progress import Display
from flywheel.settings import Settings

log = logging.getLogger(__name__)
SCENARIOS = ("default", "reward-hacking")


@dataclass(frozen=True)
class DemoConfig:
    cycles: int = 2
    honest_users: int = 120  # per cycle; adversaries come on top (adversary_share of all users)
    conversations_per_user: int = 6
    adversary_share: float = 0.10
    scenario: str = "default"
    prompts: int = 150  # ShareGPT prompts the users ask (the first ones in the file)
    eval_prompts: int = 200  # held-out ShareGPT prompts (after those) both policies answer at each gate
    ppo_steps: int = 0  # 0 = the demo recipe's
    ppo_batch: int = 0  # responses a PPO step (rollout batch = minibatch); 0 = the demo recipe's
    chats_per_cycle: int = 2  # live /v1/chat calls answered by the serving champion
    # answers of the serving champion to each prompt, served beside the ShareGPT styles: feedback then ranks the
    # champion's own answers, which is what the reward model must judge at the next gate (0 = ShareGPT only)
    model_samples: int = 4
    reviewers: int = 3  # simulated reviewers working the review queue each cycle through the HTTP endpoints
    reviewer_error: float = 0.1  # ... each wrong this share of the time
    seed: int = 0

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        """A smoke run of every step for CI, in under 3 minutes here: one cycle, 48 honest users asking 48 prompts
        with one champion answer each, 2 PPO steps of 8 responses, 24 held-out prompts at the gate, no simulated
        reviewers (``reviewers=3`` adds them: with 48 users the reward model's gate sees 7 or 8 eval pairs, and the
        few corrections reviewers rightly reject can tip its 95% interval below 0.5)."""
        return cls(**{"cycles": 1, "honest_users": 48, "prompts": 48, "ppo_steps": 2, "ppo_batch": 8,
                      "eval_prompts": 24, "chats_per_cycle": 1, "model_samples": 1, "reviewers": 0, **kw})

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if not 0 <= self.adversary_share < 1:
            raise ValueError(f"adversary_share must be in [0, 1), got {self.adversary_share}")
        if self.cycles < 1 or self.honest_users < 1 or self.eval_prompts < 1 or self.prompts < 1:
            raise ValueError("cycles, honest_users, prompts and eval_prompts must be positive")
        if self.ppo_steps < 0 or self.ppo_batch < 0:
            raise ValueError("ppo_steps and ppo_batch must be 0 (the recipe's) or positive")

    @property
    def users(self) -> int:
        """All users of a cycle: the honest ones plus adversaries making up ``adversary_share`` of them."""
        return self.honest_users + round(self.honest_users * self.adversary_share / (1 - self.adversary_share))


@dataclass
class Cycle:
    number: int
    start: str
    end: str
    events_sent: int = 0
    answered_by: str = ""  # the champion whose answers the users rated ("" = ShareGPT answers only)
    served_by: list[str] = field(default_factory=list)
    curation: dict[str, Any] = field(default_factory=dict)
    filters: dict[str, Any] = field(default_factory=dict)
    reward: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    review: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


_ui: Display | None = None  # the running demo's display (set by run_demo)


def _say(msg: str) -> None:
    if _ui is not None:
        _ui.say(msg)
    else:
        print(msg, flush=True)


@contextmanager
def _step(name: str, timings: dict[str, float], key: str) -> Iterator[None]:
    """One step of the run: shown by the display, timed into ``timings[key]``."""
    with (_ui.step(name) if _ui is not None else nullcontext()), _Timer(timings, key):
        yield


class _Timer:
    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name

    def __enter__(self) -> _Timer:
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.into[self.name] = round(time.monotonic() - self.t, 1)


def run_settings(settings: Settings, run_dir: Path, hours: int = 1) -> Settings:
    """The settings of one demo run: everything embedded under ``run_dir`` (a broker of its own on a free port,
    unless an external Kafka is configured), the demo recipes, one-hour cycles, and a training window of all
    ``hours`` of the run: each cycle's reward model learns from every hour so far, and it, the judge and the
    gate are measured on the eval pairs of every hour so far, not of one hour."""
    from flywheel.app import stack

    s = settings.model_copy(deep=True)
    if stack.uses_embedded_broker(settings):
        s.embedded.broker_port = stack.free_port()
        s.kafka.bootstrap_servers = f"127.0.0.1:{s.embedded.broker_port}"
    s.home = run_dir
    s.lake.uri = (run_dir / "lake").as_uri()
    s.mlflow.tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    s.mlflow.artifact_uri = (run_dir / "mlartifacts").as_uri()
    s.api.spool_dir = str(run_dir / "spool")
    s.loop.reward_recipe = "reward-minilm-demo.yaml"
    s.loop.policy_recipe = "policy-ppo-demo.yaml"
    s.loop.gate_recipe = "gate-demo.yaml"
    s.loop.train_window_h = float(hours)
    s.loop.min_new_pairs = 0
    s.api.gate_recipe = "gate-demo.yaml"
    s.api.policy_from_registry = True
    s.api.policy_poll_s = 1.0
    s.api.max_new_tokens = 32
    return s


def win_rate(a: list[str], b: list[str], score: Any) -> dict[str, float]:
    """Share of prompts where answer a scores higher than answer b (ties count half), with a 95% interval."""
    from training.evaluation import wilson

    sa, sb = np.array([score(x) for x in a]), np.array([score(x) for x in b])
    outcome = (sa > sb) + 0.5 * (sa == sb)
    low, high = wilson(float(outcome.sum()), len(outcome))
    return {"win_rate": float(outcome.mean()), "ci_low": low, "ci_high": high, "prompts": len(outcome),
            "ties": float((sa == sb).mean())}


def run_demo(settings: Settings, cfg: DemoConfig, *, run_dir: Path | None = None,
             display: Display | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary written to ``summary.json`` (the report's numbers). ``display`` shows
    its progress (plain lines, one a step, without one)."""
    global _ui
    _ui = display or Display(live=False)
    try:
        return _run_demo(settings, cfg, run_dir)
    finally:
        _ui = None


def demo_run_dir(settings: Settings, cfg: DemoConfig) -> Path:
    """Where a run's files go (report, summary, simulations, its log) unless the caller names a directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return (settings.home / "demo" / f"{stamp}-{cfg.scenario}-seed{cfg.seed}").resolve()


def _run_demo(settings: Settings, cfg: DemoConfig, run_dir: Path | None) -> dict[str, Any]:

    from flywheel.app import loop, stack
    from flywheel.app.simulate import (
        SimConfig,
        hidden_preference_accuracy,
        reward_hacking_config,
        send_events,
        simulate_events,
        write_truth,
    )
    from ingest.lake import wait_for_events
    from pipelines.sharegpt import chat_samples
    from serving.champion import ChampionPolicy
    from training.registry import CHAMPION, alias_version, bootstrap_policy, registry_client
    from training.reward.train import load_registered_reward
    from training.tracking import POLICY_MODEL, REWARD_MODEL

    t_start = time.monotonic()
    run_dir = (run_dir or demo_run_dir(settings, cfg)).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    s = run_settings(settings, run_dir, cfg.cycles)
    _say(f"flywheel demo ({cfg.scenario}, seed {cfg.seed}, {cfg.cycles} cycle(s), {cfg.users} users a cycle of "
         f"whom {cfg.users - cfg.honest_users} adversaries): {run_dir}")

    # --- the simulated world: every cycle's traffic, one hour each, ending at the last full hour
    samples = chat_samples(cfg.prompts + cfg.eval_prompts)
    if len(samples) < cfg.prompts + cfg.eval_prompts:
        raise ValueError(f"the ShareGPT file holds only {len(samples)} usable prompts")
    held_out = [x.prompt for x in samples[cfg.prompts:cfg.prompts + cfg.eval_prompts]]
    h0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=cfg.cycles)
    sim_cfgs, sims, cycles = [], [], []
    for k in range(1, cfg.cycles + 1):
        sim_cfg = SimConfig(users=cfg.users, conversations_per_user=cfg.conversations_per_user,
                            adversary_share=1 - cfg.honest_users / cfg.users, prompts=cfg.prompts,
                            seed=cfg.seed * 1_000 + k)
        if cfg.scenario == "reward-hacking":
            sim_cfg = reward_hacking_config(sim_cfg)
        end = h0 + timedelta(hours=k)
        # who the users are (and which accounts are blocked) does not depend on the answers they will get: the
        # cycle's traffic is simulated again once the champion of that cycle has answered (_traffic)
        sim = simulate_events(samples, sim_cfg, now=end - timedelta(minutes=2))
        assert sum(r == "honest" for r in sim.truth["users"].values()) == cfg.honest_users
        sim_cfgs.append(sim_cfg)
        sims.append(sim)
        cycles.append(Cycle(k, (end - timedelta(hours=1)).isoformat(), end.isoformat()))
    preference = sims[0].truth["preference"]
    from flywheel.app.simulate import HiddenPreference

    truth = HiddenPreference(**preference)
    # accounts trust & safety flagged before the traffic: the consumer and curation both know them
    s.curation.blocked_users = sorted({u for sim in sims for u in sim.blocked_users})

    with _step("start the stack (broker, MLflow, lake) and register the base policy", timings := {}, "stack"):
        for k_, v in stack.up(s).items():
            _say(f"  {k_:7s} {v}")
        v1 = bootstrap_policy(s)
    _say(f"champion: {POLICY_MODEL} v{v1} (SmolLM2-135M-Instruct); held-out prompts: {len(held_out)}")
    cache: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}  # version -> its answers to the held-out prompts
    client_reg = registry_client(s)
    champion_policy = ChampionPolicy(s, poll_s=s.api.policy_poll_s)
    reviewers = _reviewer_keys(s, cfg)
    try:
        with stack.local_feedback_path(s, "demo") as (state, client):
            loader = threading.Thread(target=lambda: setattr(state, "policy", champion_policy.start()),
                                      name="policy-loader", daemon=True)
            loader.start()
            _say(f"API on {client.base_url} serving models:/{POLICY_MODEL}@{CHAMPION}; consumer writing the lake")
            for cyc, sim_cfg in zip(cycles, sim_cfgs, strict=True):
                tag = f"cycle {cyc.number}/{cfg.cycles} ·"
                _say(f"\n=== cycle {cyc.number}/{cfg.cycles}: traffic of [{cyc.start[11:16]}, {cyc.end[11:16]}) UTC ===")
                # 0. the chat service answers the users' prompts with the serving champion
                with _step(f"{tag} the chat service answers the users' prompts", cyc.seconds, "chat_service"):
                    loader.join()
                    sim, cyc.answered_by = _traffic(champion_policy, samples, sim_cfg, cfg, cyc)
                    write_truth(run_dir / "simulations" / f"truth-cycle{cyc.number}.json", sim)
                # 1. traffic through the real API
                with _step(f"{tag} users' feedback through the API into the lake", cyc.seconds, "traffic"):
                    cyc.events_sent = send_events(client, sim.events)
                    for prompt in held_out[:cfg.chats_per_cycle]:
                        r = client.post("/v1/chat", json={"user_id": "u-demo", "max_new_tokens": 32, "seed": cfg.seed,
                                                          "messages": [{"role": "user", "content": prompt}]})
                        r.raise_for_status()
                        cyc.served_by.append(r.json()["model_version"])
                    lake = s.lake
                    from flywheel.storage import open_storage

                    missing = wait_for_events(open_storage(lake.uri, lake), {e["event_id"] for e in sim.events},
                                              since=datetime.fromisoformat(cyc.start) - timedelta(hours=1), timeout=300)
                    if missing:
                        raise TimeoutError(f"{len(missing)} events did not reach the lake")
                _say(f"{cyc.events_sent} events accepted and in the lake; /v1/chat answered by {sorted(set(cyc.served_by))}")
                # 2. curate the hour
                with _step(f"{tag} curation", cyc.seconds, "curate"):
                    cur = loop.curate_interval(cyc.start, cyc.end, s, with_review=True)
                    from flywheel.app.simulate import filter_report
                    from pipelines.dataset import open_dataset

                    ds = open_dataset(cur["dataset"], s)
                    cyc.filters = filter_report(ds.table("quarantine"), sim.truth)
                cyc.curation = {k: cur[k] for k in ("dataset", "pairs", "events_read", "feedback_read", "held_at_ingest",
                                                    "held_back", "held_back_by_reason", "pairs_by_source", "agreement")}
                _say(f"curated dataset {cur['dataset']}: {cur['feedback_read']} feedback events, held back "
                     f"{cur['held_back'] + cur['held_at_ingest']} {cur['held_back_by_reason']} (precision "
                     f"{cyc.filters['precision']:.2f}, recall {cyc.filters['recall']:.2f} against the simulation's truth), "
                     f"{cur['pairs']} pairs")
                # 2b. simulated reviewers work the queue through the API; their decisions travel to the lake
                if reviewers:
                    with _step(f"{tag} human review (simulated reviewers)", cyc.seconds, "review"):
                        cyc.review = _review_cycle(s, client, reviewers, sim.truth, truth, cyc, cfg.seed)
                    rv = cyc.review
                    _say(f"review: {rv['routed']} items routed {rv['routed_by_route']}; {len(reviewers)} simulated "
                         f"reviewers (error rate {cfg.reviewer_error:.0%}) decided {rv['reviewed']} "
                         f"{rv['outcomes']}, rejected {rv['rejected_by_reason']}; filters' precision by review "
                         f"{_num(rv['filter_precision']['precision'])}; kappa "
                         f"{[k['kappa'] for k in rv['kappa']]}")
                # 3. reward model, its gate
                with _step(f"{tag} reward model: train, evaluate, gate", cyc.seconds, "reward"):
                    rm = loop.train_reward_model(cyc.end, s)  # on every hour so far
                    pairs = open_dataset(rm["dataset"], s).table("pairs")
                    eval_pairs = pairs[pairs["split"] == "eval"].reset_index(drop=True)
                    acc = hidden_preference_accuracy(load_registered_reward(f"models:/{REWARD_MODEL}/{rm['version']}"),
                                                     eval_pairs, truth)
                    gate_rm = loop.evaluate_and_promote(REWARD_MODEL, rm["version"], s, dataset=rm["dataset"],
                                                        actor="flywheel-demo")
                cyc.reward = {"version": rm["version"], "metrics": rm["metrics"],
                              "hidden_preference_accuracy": acc["hidden_preference"].get("accuracy"),
                              "hidden_preference_pairs": acc["hidden_preference"]["pairs"],
                              "labels_agree_with_hidden_preference": acc["labels_agree_with_hidden_preference"],
                              "action": gate_rm["action"], "reasons": gate_rm["reasons"],
                              "audit": {k[6:]: v for k, v in (gate_rm.get("challenger_metrics") or {}).items()
                                        if k.startswith("audit/")}}
                _say(f"reward model v{rm['version']}: eval accuracy {rm['metrics'].get('eval/accuracy', float('nan')):.3f}, "
                     f"against the hidden preference {cyc.reward['hidden_preference_accuracy'] or float('nan'):.3f}; "
                     f"gate: {gate_rm['action'].upper()} ({'; '.join(gate_rm['reasons'])})")
                # 4. policy: PPO, evaluation, gate, promotion
                with _step(f"{tag} policy: PPO, evaluation, gate", cyc.seconds, "policy"):
                    cyc.policy = _policy_cycle(s, cfg, rm["dataset"], held_out, cache, answers, truth, v1)
                if cyc.policy.get("promoted"):
                    new = cyc.policy["version"]
                    with _step(f"{tag} serving picks up the new champion", cyc.seconds, "serving_swap"):
                        deadline = time.monotonic() + 120
                        while champion_policy.versions()["champion"] != f"{POLICY_MODEL}/{new}":
                            if time.monotonic() > deadline:
                                raise TimeoutError(f"serving did not pick up {POLICY_MODEL}/{new}")
                            time.sleep(0.5)
                    r = client.post("/v1/chat", json={"user_id": "u-demo", "max_new_tokens": 32, "seed": cfg.seed,
                                                      "messages": [{"role": "user", "content": held_out[0]}]})
                    r.raise_for_status()
                    cyc.policy["served_after"] = r.json()["model_version"]
                    _say(f"serving now answers as {cyc.policy['served_after']} "
                         f"(picked up in {cyc.seconds['serving_swap']:.0f}s)")
                _say(f"cycle {cyc.number} took {sum(cyc.seconds.values()):.0f}s {cyc.seconds}")
    finally:
        champion_policy.close()  # stop polling the registry even when a step failed
        stack.down(s)

    final = alias_version(client_reg, POLICY_MODEL, CHAMPION)
    summary: dict[str, Any] = {"config": asdict(cfg), "run_dir": str(run_dir), "preference": preference,
                               "rater": sims[0].truth["rater"], "v1": v1, "final_champion": final,
                               "promotions": [c.policy["version"] for c in cycles if c.policy.get("promoted")],
                               "cycles": [asdict(c) for c in cycles], "seconds": {**timings}}
    if final != v1 and final in answers and v1 in answers:
        summary["final_vs_v1"] = win_rate(answers[final], answers[v1], truth.score)
    else:
        summary["final_vs_v1"] = None
    summary["seconds"]["total"] = round(time.monotonic() - t_start, 1)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    from flywheel.app.demo_report import write_report

    with _step("report", summary["seconds"], "report"):
        md = write_report(summary, run_dir)
    if _ui is not None:
        _ui.summary("the run, cycle by cycle", _summary_rows(summary),
                    ("cycle", "events", "pairs", "reward model (hidden pref.)", "its gate", "policy win rate",
                     "its gate", "seconds"))
    _say(_closing(summary, md))
    return summary


def _summary_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for c in summary["cycles"]:
        rm, pol = c.get("reward") or {}, c.get("policy") or {}
        hp = (pol.get("hidden_preference") or {}).get("win_rate")
        rows.append((str(c["number"]), str(c["events_sent"]), str((c.get("curation") or {}).get("pairs", "")),
                     f"v{rm.get('version', '?')} {_num(rm.get('hidden_preference_accuracy'))}", rm.get("action", ""),
                     f"v{pol['version']} {_num(hp)}" if pol.get("trained") else "—", pol.get("action", ""),
                     f"{sum(c['seconds'].values()):.0f}"))
    return rows


def _traffic(champion: Any, samples: list[Any], sim_cfg: Any, cfg: DemoConfig, cyc: Cycle) -> tuple[Any, str]:
    """The cycle's simulated traffic, with the serving champion's answers to the users' prompts served beside
    the ShareGPT styles; returns the simulation and the version that answered."""
    from flywheel.app.simulate import simulate_events

    now = datetime.fromisoformat(cyc.end) - timedelta(minutes=2)
    if cfg.model_samples <= 0:
        return simulate_events(samples, sim_cfg, now=now), ""
    handle = champion.pick()
    pool = samples[sim_cfg.prompt_offset: sim_cfg.prompt_offset + sim_cfg.prompts]
    t = time.monotonic()
    replies = handle.generate_many([x.prompt for x in pool], 32, samples=cfg.model_samples,
                                   seed=cfg.seed * 1_000 + cyc.number, max_prompt_tokens=64)
    answers = [[r.text for r in rs] for rs in replies]
    _say(f"chat service: {handle.version} answered the users' {len(pool)} prompts {cfg.model_samples} times each "
         f"in {time.monotonic() - t:.0f}s")
    return simulate_events(samples, sim_cfg, now=now, model_answers=answers, model_version=handle.version), handle.version


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _reviewer_keys(s: Settings, cfg: DemoConfig) -> list[Any]:
    """API keys with the reviewer role for the simulated reviewers (before the API starts: it reads its keys once)."""
    import secrets

    from flywheel.app.reviewers import SimReviewer
    from flywheel.settings import ApiKey, hash_api_key

    out = [SimReviewer(f"reviewer-{i + 1}", secrets.token_urlsafe(24), cfg.reviewer_error) for i in range(cfg.reviewers)]
    s.api.keys = [*s.api.keys, *(ApiKey(name=r.name, sha256=hash_api_key(r.secret), reviewer=True) for r in out)]
    return out


def _review_cycle(s: Settings, client: Any, reviewers: list[Any], sim_truth: dict[str, Any], preference: Any,
                  cyc: Cycle, seed: int) -> dict[str, Any]:
    """The reviewers work the queue until it is empty for them; then the hour is curated again with their
    decisions (what the reward model's training window will see) and its review section is returned."""
    from flywheel.app import loop
    from flywheel.app.reviewers import work_queue
    from flywheel.storage import open_storage
    from ingest.lake import wait_for_events
    from pipelines.dataset import open_dataset
    from pipelines.review import read_queue

    storage = open_storage(s.lake.uri, s.lake)
    queued = len(read_queue(storage))
    headers = {"Authorization": f"Bearer {reviewers[0].secret}"}
    deadline = time.monotonic() + 30
    while client.get("/v1/review/stats", headers=headers).json()["routed"] < queued:  # the desk re-reads the queue
        if time.monotonic() > deadline:
            raise TimeoutError("the review desk did not pick up the curated queue")
        time.sleep(0.5)
    done = work_queue(client, reviewers, sim_truth, preference, seed=seed * 1_000 + cyc.number)
    missing = wait_for_events(storage, set(done["event_ids"]),
                              since=datetime.fromisoformat(cyc.start) - timedelta(hours=1), timeout=120)
    if missing:
        raise TimeoutError(f"{len(missing)} review events did not reach the lake")
    again = loop.curate_interval(cyc.start, cyc.end, s)
    section = open_dataset(again["dataset"], s).manifest["review"]
    return section | {"simulated": {k: v for k, v in done.items() if k != "event_ids"}}


def _policy_cycle(s: Settings, cfg: DemoConfig, dataset: str, held_out: list[str], cache: dict[str, Any],
                  answers: dict[str, list[str]], truth: Any, v1: str) -> dict[str, Any]:
    from flywheel.app import loop
    from training.tracking import POLICY_MODEL

    # 0 = the recipe's
    overrides = {k: v for k, v in {"steps": cfg.ppo_steps, "rollout_batch": cfg.ppo_batch,
                                   "minibatch": cfg.ppo_batch}.items() if v}
    try:
        pol = loop.train_policy(dataset, s, overrides=overrides)
    except loop.NoRewardModel as e:
        _say(f"policy: not trained — {e}")
        return {"trained": False, "promoted": False, "action": "skip", "reasons": [str(e)]}
    _say(f"policy v{pol['version']}: PPO from {pol['start_policy']} against reward model v{pol['reward_model_version']}")
    res = loop.evaluate_and_promote(POLICY_MODEL, pol["version"], s, prompts=held_out, cache=cache, with_report=True,
                                    actor="flywheel-demo")
    rep = res.get("report") or {}
    out: dict[str, Any] = {"trained": True, "version": pol["version"], "start_policy": pol["start_policy"],
                           "reward_model_version": pol["reward_model_version"], "promoted": res["promoted"],
                           "action": res["action"], "reasons": res["reasons"],
                           "champion_version": rep.get("champion_version"),
                           "challenger": res.get("challenger_metrics"), "champion": res.get("champion_metrics")}
    if rep.get("answers"):
        a = rep["answers"]
        answers[str(pol["version"])] = a["challenger"]
        answers.setdefault(str(rep["champion_version"]), a["champion"])
        out["hidden_preference"] = win_rate(a["challenger"], a["champion"], truth.score)
        out["examples"] = [{"prompt": p[:160], "challenger": c[:200], "champion": d[:200]}
                           for p, c, d in list(zip(a["prompts"], a["challenger"], a["champion"], strict=True))[:3]]
        ch = out["challenger"]
        _say(f"evaluation on {len(a['prompts'])} held-out prompts: win rate vs v{rep['champion_version']} on the hidden "
             f"preference {out['hidden_preference']['win_rate']:.3f} "
             f"[{out['hidden_preference']['ci_low']:.3f}, {out['hidden_preference']['ci_high']:.3f}], as the judge "
             f"saw it {ch['win_rate']:.3f} (length-controlled {ch['lc_win_rate']:.3f}); KL {ch['kl']:.2f}, "
             f"length {ch['length_mean']:.1f} vs {out['champion']['length_mean']:.1f} tokens")
    _say(f"gate: {res['action'].upper()} — {'; '.join(res['reasons'])}")
    return out


def _closing(summary: dict[str, Any], md: Path) -> str:
    fv = summary.get("final_vs_v1")
    lines = [f"\nreport: {md}\n        {md.with_suffix('.png')}\nlog:    {md.parent / 'run.log'}"]
    if summary["promotions"]:
        lines.append(f"promoted: {', '.join('v' + v for v in summary['promotions'])}; final champion "
                     f"v{summary['final_champion']}")
    else:
        lines.append(f"no challenger was promoted: the champion is still v{summary['v1']}")
    if fv:
        lines.append(f"final champion vs v1 on the hidden preference: win rate {fv['win_rate']:.3f} "
                     f"(95% CI {fv['ci_low']:.3f}-{fv['ci_high']:.3f}) over {fv['prompts']} held-out prompts")
    lines.append(f"total {summary['seconds']['total']:.0f}s")
    return "\n".join(lines)
