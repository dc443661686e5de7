"""Shared fixtures: a real Tansu broker and a real moto S3 server on loopback, per-test topics."""

from __future__ import annotations

import os
import secrets
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# converted base models (SmolLM2 dequantized from its GGUF) go to a cache of this test session's own, shared by
# every test and every process a test starts, and not to the user's ~/.cache
os.environ.setdefault("FLYWHEEL_MODEL_CACHE", tempfile.mkdtemp(prefix="flywheel-test-models-"))

from flywheel.app.stack import BrokerProcess, ensure_topics, free_port, start_broker  # noqa: E402
from flywheel.settings import ApiKey, Settings, hash_api_key  # noqa: E402


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One Tansu broker (memory storage) for the whole session; tests isolate themselves by topic."""
    proc = start_broker(free_port(), tmp_path_factory.mktemp("broker") / "tansu.log")
    yield proc
    proc.stop()


@pytest.fixture(params=["confluent", "kafka-python"])
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each of the consumer's Kafka clients (``ingest.client``), for the tests of the consumer's source."""
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path, broker: BrokerProcess) -> Settings:
    """Settings pointing at the session broker, with fresh topics, group and home for this test."""
    tag = uuid.uuid4().hex[:10]
    s = Settings(
        home=tmp_path / "home",
        kafka={"bootstrap_servers": broker.bootstrap, "topic": f"events-{tag}", "dlq_topic": f"dlq-{tag}",
               "group_id": f"ingest-{tag}", "partitions": 3},
        ingest={"commit_every": 500, "commit_interval_s": 0.5, "poll_timeout_ms": 200},
        api={"publish_timeout_s": 1.0, "rate_per_s": 100_000, "rate_burst": 100_000},
    )
    ensure_topics(s.kafka)
    return s


@pytest.fixture
def api_secret(settings: Settings) -> str:
    secret = secrets.token_urlsafe(16)
    settings.api.keys = [ApiKey(name="test", sha256=hash_api_key(secret))]
    return secret


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's threaded S3 server on loopback, spoken to over HTTP by boto3."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_lake(settings: Settings, s3_endpoint: str) -> str:
    """A fresh bucket on the moto server; sets ``settings.lake`` to it and returns its URI."""
    import boto3

    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    settings.lake.uri = f"s3://{bucket}/flywheel"
    settings.lake.s3_endpoint_url = s3_endpoint
    return settings.lake.uri


@pytest.fixture
def postgres_tracking_uri() -> Iterator[str]:
    """A fresh PostgreSQL database on loopback (trust auth) for an MLflow tracking store; dropped afterwards.
    PostgreSQL runs on this machine and in CI (FLYWHEEL_TEST_PG overrides the server URL)."""
    import os
    import uuid

    import psycopg

    server = os.environ.get("FLYWHEEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
    name = f"flywheel_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(f"{server}/postgres", autocommit=True)
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{server}/{name}"
    finally:
        import sqlalchemy

        sqlalchemy.create_engine(f"{server}/{name}").dispose()  # MLflow's pooled connections, if any
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
