"""The CLI's live display on a terminal: the libraries' stderr (progress bars, notices) goes to the run's log."""

import io
import sys

from flywheel.app.progress import Display, quiet_libraries


def test_on_a_terminal_what_libraries_write_to_stderr_goes_to_the_log_not_above_the_bars(tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the console as a terminal: the live bars run
    out = io.StringIO()
    with quiet_libraries(tmp_path / "run.log"), Display(file=out) as display:
        assert display.live
        with display.step("cycle 1/1 · reward model"):
            print("Downloading artifacts: 100%|##########| 6/6", file=sys.stderr)  # as tqdm writes
            sys.stderr.flush()
        display.say("reward model v1: eval accuracy 0.875")
    assert "Downloading artifacts" in (tmp_path / "run.log").read_text()
    assert "Downloading artifacts" not in out.getvalue()
    assert "reward model v1" in out.getvalue() and "cycle 1/1 · reward model" in out.getvalue()


def test_a_task_that_runs_again_gets_a_live_bar_again(monkeypatch):
    """The gate answers the challenger's prompts, then the champion's: the second run's bar starts over instead of
    showing 0/24 as finished."""
    from flywheel import progress

    monkeypatch.setenv("FORCE_COLOR", "1")
    with Display(file=io.StringIO()) as display, display.step("policy: PPO, evaluation, gate"):
        progress.report("gate answers", 24, 24)
        progress.report("gate answers", 0, 24)
        (task,) = [t for t in display._progress.tasks if "gate answers" in t.description]
        assert (task.completed, task.finished) == (0, False)
        progress.report("gate answers", 24, 24)
        assert task.finished
