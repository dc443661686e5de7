"""The ``flywheel`` command: one thin subcommand per library entry point."""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flywheel.settings import ApiKey, Settings, get_settings, hash_api_key
from training.tracking import MODELS, POLICY_MODEL, REWARD_MODEL


def _stack(args: argparse.Namespace, settings: Settings) -> int:
    from flywheel.app import stack

    if args.action == "up":
        info = stack.up(settings)
    elif args.action == "down":
        info = {"broker": "stopped" if stack.down(settings) else "was not running"}
    else:
        info = stack.status(settings)
    for k, v in info.items():
        print(f"{k:8s} {v}")
    return 0


def _schema(args: argparse.Namespace, _settings: Settings) -> int:
    from flywheel.events import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.service import ConfigurationError, run_ingest

    try:
        run_ingest(settings, _stop_on_signals(), metrics_port=args.metrics_port or None)
    except ConfigurationError as e:
        print(f"flywheel ingest: configuration error: {e}\n(a restart will not fix this: correct the settings)",
              file=sys.stderr)
        return 2
    return 0


def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from ingest.deadletters import read_parked
    from ingest.service import dead_letter_file

    total = 0
    for name in ("ingest", "spool"):
        path = dead_letter_file(settings, name)
        for r in read_parked(path):
            total += 1
            if args.json:
                print(json.dumps({"file": str(path), "parked_at": r.parked_at, "reason": r.reason,
                                  "detail": r.detail, "source": r.source, "size": r.size, "sha256": r.sha256}))
            else:
                print(f"{r.parked_at}  {name:6s}  {r.reason:28s} {r.size:>9d} B  {r.source}  {r.detail[:80]}")
    if not args.json:
        print(f"{total} parked record(s) in {settings.ingest.dead_letter_dir}")
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.policy import PolicyHandle

    if not settings.api.keys:
        print("warning: no API keys configured (FLYWHEEL_API__KEYS); every request will get 401", file=sys.stderr)
    policy: Any = None
    if args.no_policy:
        pass
    elif settings.api.policy_from_registry:
        from serving.champion import ChampionPolicy

        policy = ChampionPolicy(settings, canary_share=settings.api.canary_share,
                                poll_s=settings.api.policy_poll_s).start()
    else:
        policy = PolicyHandle.load(settings.api.policy_model, settings.api.policy_version)
    try:
        uvicorn.run(create_app(settings, policy=policy), host=args.host or settings.api.host,
                    port=args.port or settings.api.port, log_level="info", access_log=args.access_log)
    finally:
        if hasattr(policy, "close"):
            policy.close()
    return 0


def _keys(args: argparse.Namespace, _settings: Settings) -> int:
    secret = secrets.token_urlsafe(32)
    entry = {"name": args.name, "sha256": hash_api_key(secret), "admin": args.admin, "reviewer": args.reviewer}
    try:
        ApiKey(**entry)
    except ValueError as e:
        raise SystemExit(f"flywheel keys: {e}") from None
    print(f"key (give to the client, shown once): {secret}")
    print(f"settings entry (store this):          {json.dumps(entry)}")
    print(f"e.g. FLYWHEEL_API__KEYS='[{json.dumps(entry)}]'")
    return 0


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from flywheel.app.demo import DemoConfig, demo_run_dir, run_demo
    from flywheel.app.progress import Display, quiet_libraries

    chosen = {k: v for k, v in {"cycles": args.cycles, "honest_users": args.users, "adversary_share": args.adversaries,
                                "scenario": args.scenario, "eval_prompts": args.eval_prompts,
                                "ppo_steps": args.ppo_steps, "model_samples": args.model_samples,
                                "reviewers": args.reviewers, "reviewer_error": args.reviewer_error,
                                "seed": args.seed}.items() if v is not None}
    cfg = DemoConfig.quick(**chosen) if args.quick else DemoConfig(**chosen)
    run_dir = (Path(args.run_dir) if args.run_dir else demo_run_dir(settings, cfg)).resolve()
    with quiet_libraries(run_dir / "run.log", verbose=args.verbose), Display() as display:
        summary = run_demo(settings, cfg, run_dir=run_dir, display=display)
    if cfg.scenario == "reward-hacking":
        return 0 if not summary["promotions"] else 1
    if args.quick:  # 2 PPO steps of 8 answers, 24 held-out prompts: a smoke run of the loop, too short to expect a promotion
        if not summary["promotions"]:
            print("(--quick only shows that every step of the loop runs; the full demo is what shows promotions)")
        return 0
    return 0 if summary["promotions"] else 1


def _demo_feedback(args: argparse.Namespace, settings: Settings) -> int:
    from flywheel.app.feedback_demo import run_feedback_demo

    result = run_feedback_demo(settings, events=args.events, chats=0 if args.no_policy else args.chats, seed=args.seed)
    return 0 if result["complete"] else 1


def _when(text: str) -> datetime:
    """ISO 8601 time (UTC assumed without an offset) or a relative ``-2h`` / ``-30m`` / ``now``."""
    now = datetime.now(UTC)
    if text == "now":
        return now
    if text.startswith("-") and text[-1] in "hmd":
        n = float(text[1:-1])
        return now - {"h": timedelta(hours=n), "m": timedelta(minutes=n), "d": timedelta(days=n)}[text[-1]]
    dt = datetime.fromisoformat(text)
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def _curate(args: argparse.Namespace, settings: Settings) -> int:
    from pipelines.curation import curate

    if args.blocklist:
        settings.curation.blocklist_file = args.blocklist
    result = curate(settings, _when(args.start), _when(args.end))
    m = result.manifest
    print(f"dataset {result.version}  ->  {result.uri}")
    print(f"  feedback read {m['feedback_read']} (+{m['held_at_ingest']} held at ingest), held back {m['held_back']}: "
          f"{ {k: v for k, v in m['held_back_by_reason'].items() if v} }")
    print(f"  pairs {m['files']['pairs.parquet']['rows']} by source {m['pairs_by_source']}, split {m['pairs_by_split']}")
    print(f"  agreement {m['agreement']}; unpaired {m['unpaired_by_label']}; prompts {m['prompts']} "
          f"in {m['prompt_groups']} groups; PII masked {m['pii_masked']}")
    print(f"  card: {result.uri}/card.md")
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from flywheel.app.simulate import SimConfig, run_simulation

    cfg = SimConfig(users=args.users, conversations_per_user=args.conversations, adversary_share=args.adversaries,
                    prompts=args.prompts, seed=args.seed)
    run_simulation(settings, cfg, truth_path=Path(args.truth) if args.truth else None,
                   api_url=args.api_url, api_key=args.api_key)
    return 0


def _filter_report(args: argparse.Namespace, settings: Settings) -> int:
    import io

    import pandas as pd

    from flywheel.app.simulate import filter_report
    from flywheel.storage import open_storage

    storage = open_storage(settings.lake.uri, settings.lake)
    quarantine = pd.read_parquet(io.BytesIO(storage.get_bytes(f"datasets/{args.dataset}/quarantine.parquet")))
    report = filter_report(quarantine, json.loads(Path(args.truth).read_text()))
    print(json.dumps(report, indent=2))
    ok = report["precision"] >= 0.95 and report["recall"] >= 0.90 and report["honest_held_back_share"] < 0.02
    print(f"precision {report['precision']:.3f} (>= 0.95), recall {report['recall']:.3f} (>= 0.90), "
          f"honest held back {report['honest_held_back_share']:.2%} (< 2%): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def _overrides(pairs: list[str] | None) -> dict[str, object]:
    """``--set key=value`` (values parsed as YAML: numbers, booleans, lists)."""
    import yaml

    out: dict[str, object] = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _train(args: argparse.Namespace, settings: Settings) -> int:
    """Also the entry point of each process under ``torchrun --no-python flywheel train ...`` (data-parallel
    reward model and PPO, see training/distributed.py): only rank 0 tracks, registers and prints."""
    from training.config import PPORecipe, PreferenceOptRecipe, RewardRecipe, load_recipe
    from training.distributed import teardown

    default = {"reward": "reward-minilm.yaml", "policy": "policy-ppo-lora.yaml"}[args.what]
    recipe = load_recipe(args.recipe or default, _overrides(args.set))
    try:
        if args.what == "reward":
            if not isinstance(recipe, RewardRecipe):
                raise SystemExit(f"{args.recipe}: not a reward recipe (kind: reward)")
            from training.reward.train import train_reward

            r = train_reward(settings, recipe, args.dataset, checkpoint_dir=args.checkpoint_dir)
            if r.run_id is not None:
                print(json.dumps({"run_id": r.run_id, "model": REWARD_MODEL, "version": r.model_version,
                                  "steps": r.steps, **r.metrics}, indent=2))
            return 0
        if isinstance(recipe, PPORecipe):
            from training.policy.ppo import train_ppo

            res = train_ppo(settings, recipe, args.dataset, checkpoint_dir=args.checkpoint_dir)
        elif isinstance(recipe, PreferenceOptRecipe):
            from training.policy.prefopt import train_preference_opt

            res = train_preference_opt(settings, recipe, args.dataset)
        else:
            raise SystemExit(f"{args.recipe}: not a policy recipe (kind: ppo, dpo or kto)")
        if res.run_id is not None:
            print(json.dumps(res.as_dict(), indent=2, default=str))
        return 0
    finally:
        teardown()


def _eval_hh(args: argparse.Namespace, settings: Settings) -> int:
    from training.config import RewardRecipe, load_recipe
    from training.reward.hh import DEFAULT_DIR, evaluate_hh

    recipe = load_recipe(args.recipe, _overrides(args.set))
    if not isinstance(recipe, RewardRecipe):
        raise SystemExit(f"{args.recipe}: not a reward recipe")
    for f in args.eval_file or []:
        if not Path(f).is_file():
            raise SystemExit(f"--eval-file {f}: no such file")
    report = evaluate_hh(settings, recipe, args.data or DEFAULT_DIR, args.limit, args.eval_file)
    print(json.dumps(report, indent=2))
    line = "{name}: accuracy {accuracy:.3f} [{ci_low:.3f}, {ci_high:.3f}] on {pairs} pairs"
    print(line.format(name="HH-RLHF held-out", **report))
    for name, m in report["eval_files"].items():
        print(line.format(name=name, **m))
    return 0


def _eval_reward(args: argparse.Namespace, settings: Settings) -> int:
    """Eval-split accuracy of a reward model against the dataset's labels and, with a simulation's truth file,
    against the hidden preference itself (pairs the hidden preference ranks the same either way are skipped)."""
    import mlflow

    from flywheel.app.simulate import HiddenPreference, hidden_preference_accuracy
    from pipelines.dataset import open_dataset
    from training.reward.train import evaluate, load_registered_reward

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    model = load_registered_reward(args.model)
    pairs = open_dataset(args.dataset, settings).table("pairs")
    pairs = pairs[pairs["split"] == "eval"].reset_index(drop=True)
    report: dict[str, object] = {"model": args.model, "eval_pairs": len(pairs), **evaluate(model, pairs)}
    if args.truth:
        pref = HiddenPreference(**json.loads(Path(args.truth).read_text())["preference"])
        report |= hidden_preference_accuracy(model, pairs, pref)
    print(json.dumps(report, indent=2))
    return 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from training.config import GateRecipe, load_recipe
    from training.evaluation import evaluate_challenger

    gate = load_recipe(args.gate, _overrides(args.set))
    if not isinstance(gate, GateRecipe):
        raise SystemExit(f"{args.gate}: not a gate recipe (kind: gate)")
    report = evaluate_challenger(settings, args.model, args.challenger, dataset=args.dataset, recipe=gate)
    shown = report.as_dict()
    shown.pop("samples", None)
    print(json.dumps(shown, indent=2, default=str))
    from training.registry import gate_decision

    decision = gate_decision(report, gate)
    print(f"gate preview ({gate.name}; `flywheel promote` decides and records): "
          f"{'PASS' if decision.promote else 'FAIL'}: " + "; ".join(decision.reasons))
    return 0


def _print_record(record: Any) -> None:
    print(f"{record.at}  {record.model}  {record.action:9s} v{record.version}  champion {record.previous} -> "
          f"{record.champion}  by {record.actor}")
    for reason in record.reasons:
        print(f"    - {reason}")


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from training.config import GateRecipe, load_recipe
    from training.registry import GateError, promote

    gate = load_recipe(args.gate)
    if not isinstance(gate, GateRecipe):
        raise SystemExit(f"{args.gate}: not a gate recipe (kind: gate)")
    try:
        record = promote(settings, args.model, args.version, gate=gate, force=args.force, note=args.note)
    except GateError as e:
        raise SystemExit(str(e)) from None
    _print_record(record)
    return 0 if record.action in ("promote", "force") else 3


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from training.registry import GateError, rollback

    try:
        _print_record(rollback(settings, args.model, to=args.to, note=args.note))
    except GateError as e:
        raise SystemExit(str(e)) from None
    return 0


def _history(args: argparse.Namespace, settings: Settings) -> int:
    from dataclasses import asdict

    from training.registry import AuditLog

    records = AuditLog.from_settings(settings).history(args.model)
    if args.json:
        print(json.dumps([asdict(r) for r in records], indent=2, default=str))
    for record in [] if args.json else records:
        _print_record(record)
    if not records and not args.json:
        print("no registry history yet")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from flywheel.app.status import gather, render

    status = gather(settings, timeout_s=args.timeout)
    print(json.dumps(status, indent=1, default=str) if args.json else render(status))
    return 0


def _bootstrap(_args: argparse.Namespace, settings: Settings) -> int:
    from training.registry import bootstrap_policy

    print(f"{POLICY_MODEL} champion: version {bootstrap_policy(settings)}")
    return 0


def _airflow(args: argparse.Namespace, settings: Settings) -> int:
    from flywheel.app import orchestrator

    if args.action == "up":
        return orchestrator.up(settings)
    orchestrator.prepare(settings)
    print(f"AIRFLOW_HOME={settings.home / 'airflow'}: metadata DB migrated, pool {orchestrator.TRAINING_POOL} set")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flywheel", description="Continuous RLHF from user feedback.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stack", help="start/stop/inspect the embedded broker, lake and MLflow store")
    s.add_argument("action", choices=["up", "down", "status"])
    s.set_defaults(func=_stack)

    s = sub.add_parser("schema", help="write the event JSON Schema (what direct Kafka producers follow)")
    s.add_argument("--out", help="file to write (default: stdout)")
    s.set_defaults(func=_schema)

    s = sub.add_parser("ingest", help="run the consumer: Kafka -> validation -> lake / dead letters")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    s.set_defaults(func=_ingest)

    s = sub.add_parser("dead-letters", help="list records parked in the local dead-letter files, with reasons")
    s.add_argument("--json", action="store_true", help="one JSON object a line")
    s.set_defaults(func=_dead_letters)

    s = sub.add_parser("serve", help="run the HTTP API")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--no-policy", action="store_true", help="do not load the policy (/v1/chat answers 503)")
    s.add_argument("--access-log", action="store_true", help="log every request (GET /metrics has the counts)")
    s.set_defaults(func=_serve)

    s = sub.add_parser("keys", help="create an API key and print its hashed settings entry")
    s.add_argument("--name", required=True)
    s.add_argument("--admin", action="store_true")
    s.add_argument("--reviewer", action="store_true", help="may review flagged feedback (/review)")
    s.set_defaults(func=_keys)

    s = sub.add_parser("simulate", help="simulated users (honest + adversaries) sending events over the HTTP API")
    s.add_argument("--users", type=int, default=200)
    s.add_argument("--conversations", type=int, default=6, help="conversations per user")
    s.add_argument("--adversaries", type=float, default=0.10, help="share of users who are adversaries")
    s.add_argument("--prompts", type=int, default=120, help="distinct ShareGPT prompts the users draw from")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--truth", help="ground-truth side file (default: <home>/simulations/truth-<seed>.json)")
    s.add_argument("--api-url", help="an API that is already running (default: start the embedded stack)")
    s.add_argument("--api-key", help="its API key")
    s.set_defaults(func=_simulate)

    s = sub.add_parser("curate", help="build the preference datasets of a lake interval (idempotent)")
    s.add_argument("--start", required=True, help="ISO time or relative (-2h); inclusive")
    s.add_argument("--end", default="now", help="ISO time, relative or 'now'; exclusive")
    s.add_argument("--blocklist", help="file of blocked user ids (else FLYWHEEL_CURATION__BLOCKLIST_FILE)")
    s.set_defaults(func=_curate)

    s = sub.add_parser("filter-report", help="precision/recall of a dataset's quarantine against a simulation's truth")
    s.add_argument("--dataset", required=True, help="dataset version id")
    s.add_argument("--truth", required=True, help="the simulation's side file")
    s.set_defaults(func=_filter_report)

    s = sub.add_parser("train", help="train the reward model or the policy on a curated dataset (MLflow-tracked)")
    s.add_argument("what", choices=["reward", "policy"])
    s.add_argument("--dataset", required=True, help="dataset URI (…/datasets/<version>) or version id")
    s.add_argument("--recipe", help="a YAML recipe (path, or a name in configs/)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field (repeatable)")
    s.add_argument("--checkpoint-dir", help="checkpoint here and resume from here if a checkpoint exists")
    s.set_defaults(func=_train)

    s = sub.add_parser("eval-reward", help="a reward model's accuracy on a dataset's eval split (and vs a simulation's truth)")
    s.add_argument("--model", default=f"models:/{REWARD_MODEL}@challenger", help="models:/… URI or a local directory")
    s.add_argument("--dataset", required=True, help="dataset URI or version id")
    s.add_argument("--truth", help="a `flywheel simulate` truth file: also score against the hidden preference")
    s.set_defaults(func=_eval_reward)

    s = sub.add_parser("eval-hh", help="train the reward recipe on 80%% of HH-RLHF, report accuracy per subset")
    s.add_argument("--recipe", default="reward-minilm-hh.yaml")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field (repeatable)")
    s.add_argument("--data", help="directory with the HH-RLHF files (default: ../shared/data/hh-rlhf)")
    s.add_argument("--limit", type=int, default=0, help="at most this many pairs per subset (0 = all)")
    s.add_argument("--eval-file", action="append", metavar="F",
                   help="after training, also score this JSONL file of {prompt, chosen, rejected} lines (repeatable)")
    s.set_defaults(func=_eval_hh)

    models = list(MODELS)
    s = sub.add_parser("evaluate", help="a registered challenger vs the champion: win rates, KL, length, probes; logged")
    s.add_argument("--challenger", required=True, help="the version to evaluate")
    s.add_argument("--model", default=POLICY_MODEL, choices=models)
    s.add_argument("--dataset", help="dataset version for eval prompts/pairs (default: the challenger's own)")
    s.add_argument("--gate", default="gate.yaml", help="gate recipe (evaluation settings and thresholds)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a gate recipe field (repeatable)")
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("promote", help="run the gate on an evaluated version; move 'champion' only if it passes")
    s.add_argument("version")
    s.add_argument("--model", default=POLICY_MODEL, choices=models)
    s.add_argument("--gate", default="gate.yaml")
    s.add_argument("--force", action="store_true", help="promote even if the gate refuses (recorded as forced)")
    s.add_argument("--note", default="", help="why (kept in the history)")
    s.set_defaults(func=_promote)

    s = sub.add_parser("rollback", help="move 'champion' back to the version it replaced (or --to)")
    s.add_argument("--model", default=POLICY_MODEL, choices=models)
    s.add_argument("--to", help="the version to serve instead")
    s.add_argument("--note", default="", help="why (kept in the history)")
    s.set_defaults(func=_rollback)

    s = sub.add_parser("history", help="every promotion, refusal and rollback (who, when, why)")
    s.add_argument("--model", choices=models)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_history)

    s = sub.add_parser("status", help="one screen for an operator: services, consumer lag, the lake's last hour, "
                                      "the last dataset, champions and challengers, the next DAG runs")
    s.add_argument("--json", action="store_true", help="the same as JSON, for scripts")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds before a service counts as not answering")
    s.set_defaults(func=_status)

    s = sub.add_parser("bootstrap", help="register the base policy as flywheel-policy v1 @champion if none exists")
    s.set_defaults(func=_bootstrap)

    s = sub.add_parser("airflow", help="Airflow 3 standalone with the flywheel DAGs on the embedded stack")
    s.add_argument("action", choices=["up", "prepare"], help="up: run it; prepare: migrate the DB, create the pool")
    s.set_defaults(func=_airflow)

    s = sub.add_parser("demo", help="the whole loop on the embedded stack: simulated users -> API -> lake -> curate "
                       "-> reward model -> PPO -> gate -> promote -> serving, several cycles, with a report")
    s.add_argument("--quick", action="store_true", help="one short cycle, a smoke run of the loop (a few minutes; exit 0 whether or not it promotes)")
    s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="the libraries' warnings and log lines on the terminal too (they always go to <run dir>/run.log)")
    s.add_argument("--scenario", choices=["default", "reward-hacking"], default=None,
                   help="reward-hacking: users click for the shortest answer; the gate must refuse what that teaches")
    s.add_argument("--cycles", type=int, default=None, help="cycles of one simulated hour each (default 2)")
    s.add_argument("--users", type=int, default=None, help="honest users a cycle (default 120; --quick 48)")
    s.add_argument("--adversaries", type=float, default=None,
                   help="share of all users who are adversaries, on top of the honest ones (default 0.1)")
    s.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts at each gate (default 200)")
    s.add_argument("--ppo-steps", type=int, default=None, help="PPO steps a cycle (default: the demo recipe's)")
    s.add_argument("--model-samples", type=int, default=None,
                   help="the champion's answers to each user prompt that users rate (default 4; 0: ShareGPT answers only)")
    s.add_argument("--reviewers", type=int, default=None,
                   help="simulated reviewers working the review queue each cycle (default 3; 0: no review)")
    s.add_argument("--reviewer-error", type=float, default=None, help="share of their calls each gets wrong (default 0.1)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--run-dir", help="where the run's stack, models and report go (default <home>/demo/<run>)")
    s.set_defaults(func=_demo)

    s = sub.add_parser("demo-feedback", help="only the feedback path: traffic over HTTP into the lake, shown")
    s.add_argument("--events", type=int, default=2_000, help="events to send over HTTP")
    s.add_argument("--chats", type=int, default=3, help="replies to generate with the policy")
    s.add_argument("--no-policy", action="store_true", help="skip loading SmolLM2 (no /v1/chat calls)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_demo_feedback)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for noisy in ("kafka", "httpx"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
    return int(args.func(args, get_settings()))


if __name__ == "__main__":
    sys.exit(main())
