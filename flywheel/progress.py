"""Progress of long steps: stages report it, the application shows it.

A stage's loop calls :func:`report` (``report("reward model", step, total, loss=0.41, accuracy=0.73)``); it costs
nothing when nobody listens. The CLI's display (``flywheel.app.progress``) listens for the duration of a run and
draws a bar per task, or writes nothing at all when the output is not a terminal. Stages never print.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Update:
    task: str  # what is being done, e.g. "reward model" or "policy (PPO)"
    done: int
    total: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


Listener = Callable[[Update], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def report(task: str, done: int, total: int | None = None, **metrics: float) -> None:
    """Tell whoever listens how far ``task`` got. Never raises: a broken display must not stop training."""
    if not _listeners:
        return
    update = Update(task, done, total, {k: float(v) for k, v in metrics.items()})
    for listener in list(_listeners):
        try:
            listener(update)
        except Exception:  # noqa: BLE001, S112  # the display's problem, never the stage's
            continue


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Send every :func:`report` to ``listener`` while the block runs."""
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
