"""What the CLI shows while it works, and where everything else goes.

:class:`Display` is the one live display of a command (rich): a line for the current step (``cycle 1/2 · reward
model``) and a bar with an ETA for each long task the stages report through :mod:`flywheel.progress` (answers
generated, reward-model steps with loss and accuracy, policy steps with reward and KL). When the output is not a
terminal (CI, a log file) it writes plain lines instead, one a step, and no bars.

:func:`quiet_libraries` sends the libraries' chatter (warnings from transformers, torch, MLflow, Kafka clients,
their progress bars and log lines) to the run's log file instead of the terminal; ``-v`` keeps it on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from flywheel import progress


def _metrics_text(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.3g}" for k, v in metrics.items())


class Display:
    """One command's progress on the terminal (live bars) or as plain lines (``live=False``)."""

    def __init__(self, *, live: bool | None = None, file: IO[str] | None = None):
        self.console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self._lock = threading.Lock()
        self._bars: dict[str, TaskID] = {}
        self._done: dict[str, int] = {}  # the last count each bar showed
        self._step: TaskID | None = None
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
            console=self.console, refresh_per_second=4, transient=True, disable=not self.live,
            # rich would otherwise print whatever is written to sys.stderr above the bars, which is where the
            # libraries' progress bars and notices go: under quiet_libraries that is the run's log file
            redirect_stderr=False)
        self._listening: Any = None

    def __enter__(self) -> Display:
        if self.live:
            self._progress.start()
        self._listening = progress.listening(self._on_update)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listening.__exit__(*exc)
        if self.live:
            self._progress.stop()

    def say(self, message: str) -> None:
        """A line of the command's own output (printed above the bars)."""
        self.console.print(message, markup=False)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """One step of the run: a plain line when it starts (``[12:01:02] cycle 1/2 · reward model``); on a
        terminal, a spinner with the elapsed time while it runs and the step's bars under it."""
        started = time.monotonic()
        if not self.live:
            self.console.print(f"[{time.strftime('%H:%M:%S')}] {name}", markup=False)
            yield
            return
        with self._lock:
            self._step = self._progress.add_task(f"[bold]{name}[/]", total=None, metrics="")
        try:
            yield
        finally:
            with self._lock:
                for bar in self._bars.values():
                    self._progress.remove_task(bar)
                self._bars.clear()
                self._done.clear()
                if self._step is not None:
                    self._progress.remove_task(self._step)
                self._step = None
            self.console.print(f"[green]✓[/] {name} [dim]({time.monotonic() - started:.0f}s)[/]")

    def _on_update(self, update: progress.Update) -> None:
        if not self.live:
            return
        with self._lock:
            bar = self._bars.get(update.task)
            if bar is None:
                bar = self._bars[update.task] = self._progress.add_task(f"  {update.task}", total=update.total,
                                                                      metrics="")
            elif update.done < self._done.get(update.task, 0):  # the task runs again (the gate answers for the
                # challenger, then for the champion): a fresh bar, not one rich still counts as finished
                self._progress.reset(bar, total=update.total)
            self._done[update.task] = update.done
            self._progress.update(bar, completed=update.done, total=update.total,
                                  metrics=_metrics_text(update.metrics))

    def summary(self, title: str, rows: list[tuple[str, ...]], header: tuple[str, ...], footer: str = "") -> None:
        """The closing table (a rich table on a terminal, aligned plain text otherwise)."""
        table = Table(*header, title=title, title_justify="left", show_lines=False)
        for row in rows:
            table.add_row(*row)
        if self.live:
            self.console.print(table)
        else:
            self.console.print(_plain_table(title, header, rows), markup=False)
        if footer:
            self.console.print(footer, markup=False)


def _plain_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


_LIBRARY_LOGGERS = ("transformers", "torch", "mlflow", "alembic", "kafka", "httpx", "urllib3", "botocore",
                    "filelock", "huggingface_hub", "datasets", "accelerate", "trl", "sqlalchemy", "airflow")


@contextmanager
def quiet_libraries(log_path: Path, *, verbose: bool = False) -> Iterator[Path]:
    """Send logging, warnings and anything written to stderr (the libraries' progress bars, C extensions'
    messages) to ``log_path`` while the block runs; the terminal keeps the command's own output (stdout). With
    ``verbose`` nothing is hidden: the log lines go to the terminal too. An error that ends the command is
    shown on the terminal after the block (the caller prints it) and written to the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false"),
                        ("MLFLOW_CONFIGURE_LOGGING", "false"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
        os.environ.setdefault(name, value)
    log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  # closed below
    root = logging.getLogger()
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level, old_handlers = root.level, root.handlers[:]
    root.handlers = [handler] + ([logging.StreamHandler(sys.__stderr__)] if verbose else [])
    root.setLevel(logging.INFO)
    for name in _LIBRARY_LOGGERS:  # libraries that attach their own stderr handlers: through the root instead
        lib = logging.getLogger(name)
        lib.handlers, lib.propagate = [], True
    logging.captureWarnings(True)
    saved_fd = None
    if not verbose:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        os.dup2(log_file.fileno(), 2)  # C extensions and child processes write to fd 2 as well
    old_stderr = sys.stderr
    if not verbose:
        sys.stderr = log_file
    try:
        yield log_path
    except BaseException:
        logging.getLogger("flywheel").exception("the command failed")
        raise
    finally:
        sys.stderr = old_stderr
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        logging.captureWarnings(False)
        root.handlers, root.level = old_handlers, old_level
        handler.close()
        log_file.close()

