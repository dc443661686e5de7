"""`flywheel demo --quick` end to end on real models (SmolLM2-135M, MiniLM): simulated users over the real API,
the consumer, curation, reward model, PPO, evaluation, gate, and serving following the champion; and the
reward-hacking scenario, which must end with no promotion and the reasons in the report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from flywheel.app.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


STEPS = ["start the stack", "cycle 1/1 · the chat service answers", "cycle 1/1 · users' feedback through the API",
         "cycle 1/1 · curation", "cycle 1/1 · reward model", "cycle 1/1 · policy", "report"]
# what the libraries print when nobody stops them: warnings, their progress bars and log lines
NOISE = re.compile(r"Warning|warnings\.warn|Loading weights|it/s\]|%\|[█▏▎▍▌▋▊▉ ]|Registered model|Created version|"
                   r"Token indices|INFO|WARNING|DEBUG|alembic|Traceback")


def test_quick_demo_runs_a_whole_cycle_and_reports_it(settings, tmp_path):
    """`flywheel demo --quick`, the command itself, with its output not a terminal (as in CI or a log file)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "FLYWHEEL_HOME": str(settings.home), "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "demo", "--quick", "--run-dir", str(run_dir)],
                          env=env, capture_output=True, text=True, timeout=1500, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # one plain progress line a step, in order, and no third-party noise: it is in the run's log file
    lines = out.splitlines()
    progress_lines = [ln for ln in lines if re.match(r"^\[\d\d:\d\d:\d\d\] ", ln)]
    assert [next(i for i, ln in enumerate(progress_lines) if step in ln) for step in STEPS] == list(range(len(STEPS))), \
        progress_lines
    assert len(progress_lines) == len(STEPS), progress_lines
    noisy = [ln for ln in lines if NOISE.search(ln)]
    assert not noisy, noisy[:10]
    assert "\x1b[" not in out  # no terminal control codes in a log
    log = (run_dir / "run.log").read_text()
    assert "Warning" in log or "INFO" in log  # the libraries' chatter went there
    assert "report:" in out and "the run, cycle by cycle" in out

    summary = json.loads((run_dir / "summary.json").read_text())
    (cycle,) = summary["cycles"]
    cur, rm, pol = cycle["curation"], cycle["reward"], cycle["policy"]
    assert cycle["events_sent"] > 500 and cycle["served_by"] == ["flywheel-policy/1"]
    assert cur["pairs"] > 80 and cur["held_back"] > 0 and cycle["filters"]["recall"] > 0.9
    assert rm["action"] == "promote" and rm["hidden_preference_accuracy"] > 0.8
    assert pol["trained"] and pol["version"] == "2" and pol["action"] in ("promote", "refuse") and pol["reasons"]
    assert pol["hidden_preference"]["prompts"] == 24
    if pol["promoted"]:  # serving picked the new champion up
        assert pol["served_after"] == "flywheel-policy/2" and summary["final_vs_v1"]["prompts"] == 24
    report = (run_dir / "report.md").read_text()
    assert "| 1 |" in report and pol["reasons"][0] in report
    assert (run_dir / "report.png").stat().st_size > 10_000


def test_the_reward_hacking_scenario_is_refused_with_its_reason(settings, tmp_path):
    summary = run_demo(settings, DemoConfig.quick(scenario="reward-hacking", honest_users=60, eval_prompts=8),
                       run_dir=tmp_path / "run")
    (cycle,) = summary["cycles"]
    assert summary["promotions"] == [] and summary["final_champion"] == summary["v1"]
    rm = cycle["reward"]
    # users clicked for the shortest answer: the model learned it, and on their clicks it looks good
    assert rm["metrics"]["eval/accuracy"] > 0.8
    # what users clicked disagrees with what they want: the labels side against the hidden preference
    assert rm["labels_agree_with_hidden_preference"] < 0.95
    # the trusted labelers' audit set shows it ranks fragments above answers, and the gate says so
    assert rm["action"] == "refuse" and rm["audit"]["says_something"] < 0.3
    assert any("audit rule 'says_something'" in r for r in rm["reasons"])
    assert not cycle["policy"]["trained"] and "no reward model has passed the gate" in cycle["policy"]["reasons"][0]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "audit rule 'says_something'" in report and "No challenger was promoted" in report
