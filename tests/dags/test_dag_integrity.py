"""Every DAG file imports cleanly, carries tags, retries and an owner, follows the loop's conventions, and
does no I/O at import (no file under the flywheel home or the lake is opened, no socket is connected, no
process is started)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("af")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.models import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"flywheel_curate", "flywheel_reward", "flywheel_policy", "flywheel_promote"}
    assert len(DAG_FILES) == 4


def test_every_dag_has_tags_retries_an_owner_and_the_loop_conventions(dagbag):
    for dag in dagbag.dags.values():
        assert "flywheel" in dag.tags, dag.dag_id
        assert dag.catchup is False and dag.max_active_runs == 1, dag.dag_id
        assert dag.doc_md and len(dag.doc_md) > 200, dag.dag_id
        for task in dag.tasks:
            assert task.owner == "ml-platform" and task.retries >= 1, (dag.dag_id, task.task_id)
            assert task.on_failure_callback, (dag.dag_id, task.task_id)
    training = {(d.dag_id, t.task_id) for d in dagbag.dags.values() for t in d.tasks if t.pool == "flywheel_training"}
    assert training == {("flywheel_reward", "train"), ("flywheel_policy", "train")}


def test_dags_are_scheduled_by_time_and_by_assets(dagbag):
    curate = dagbag.dags["flywheel_curate"]
    assert [o.uri for o in curate.get_task("curate").outlets] == ["flywheel://datasets/hourly"]
    assert type(dagbag.dags["flywheel_reward"].timetable).__name__ == "AssetTriggeredTimetable"
    assert type(dagbag.dags["flywheel_promote"].timetable).__name__ == "AssetTriggeredTimetable"
    assert type(dagbag.dags["flywheel_policy"].timetable).__name__ == "AssetOrTimeSchedule"
    assert dagbag.dags["flywheel_reward"].get_task("increment").task_type == "_ShortCircuitDecoratedOperator"


AUDIT = r'''
import os, sys, runpy
home = os.environ["FLYWHEEL_HOME"]
bad = []
def hook(event, args):
    if event in ("open", "os.mkdir", "os.scandir", "os.listdir", "os.remove", "os.rename") and args \
            and str(args[0]).startswith(home):
        bad.append((event, str(args[0])))
    elif event in ("socket.connect", "subprocess.Popen", "os.system"):
        bad.append((event, str(args[:2])))
sys.path.insert(0, sys.argv[2])
# Airflow's own imports may read its config and probe the platform; the DAG files and ours may do no I/O
from airflow.sdk import (Asset, AssetOrTimeSchedule, CronDataIntervalTimetable, CronTriggerTimetable, dag,
                         get_current_context, task)
def warm_up():
    @task
    def noop():
        return None
    noop()
dag(schedule=None)(warm_up)()
sys.addaudithook(hook)
runpy.run_path(sys.argv[1], run_name="dag_module")
print("IO:", bad)
'''


def run_audited(path, tmp_path):
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "AIRFLOW_HOME": str(tmp_path / "af"), "PATH": "/usr/bin:/bin",
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "FLYWHEEL_LAKE__URI": "s3://nowhere/lake",
           "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    out = subprocess.run([sys.executable, "-c", AUDIT, str(path), str(ROOT)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_no_io_at_import(path, tmp_path):
    out = run_audited(path, tmp_path)
    assert "IO: []" in out, out


def test_the_io_audit_catches_a_dag_file_that_touches_the_lake_at_import(tmp_path):
    bad = tmp_path / "bad_dag.py"
    bad.write_text("from flywheel.settings import Settings\nfrom flywheel.storage import open_storage\n"
                   "s = Settings(lake={'uri': ''})\nopen_storage(s.lake.uri).list('datasets/')\n")
    out = run_audited(bad, tmp_path)
    assert "IO: []" not in out and str(tmp_path / "home") in out
