"""``flywheel airflow up``: Airflow 3 standalone on this machine, running the repository's DAGs against the
embedded stack (same ``FLYWHEEL_*`` settings as the CLI).

AIRFLOW_HOME is ``<home>/airflow`` (SQLite metadata DB); the DAG folder is this checkout's ``dags/``; the
one-slot pool ``flywheel_training`` is created first so that only one training task runs at a time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flywheel.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TRAINING_POOL = "flywheel_training"


def airflow_env(settings: Settings) -> dict[str, str]:
    """The environment Airflow commands need here: its home, our DAGs, no examples, our settings."""
    home = settings.home / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    port = settings.loop.airflow_port
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",  # local use: the loop runs once Airflow is up
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
        "FLYWHEEL_HOME": str(settings.home),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }


def prepare(settings: Settings) -> dict[str, str]:
    """Migrate the metadata DB and create the training pool (both idempotent)."""
    env = airflow_env(settings)
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["airflow", "pools", "set", TRAINING_POOL, "1", "one training task at a time"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return env


def up(settings: Settings) -> int:
    """Run ``airflow standalone`` in the foreground (Ctrl-C stops it)."""
    env = prepare(settings)
    print(f"Airflow on http://localhost:{settings.loop.airflow_port} (AIRFLOW_HOME={env['AIRFLOW_HOME']}); the "
          f"admin password is in {env['AIRFLOW_HOME']}/simple_auth_manager_passwords.json.generated", flush=True)
    import signal

    proc = subprocess.Popen(["airflow", "standalone"], env=env)
    # SIGTERM (e.g. `timeout`, a service manager) must stop standalone too, or its scheduler and workers
    # outlive us (seen once); standalone stops its own children when it is terminated
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait(60)
