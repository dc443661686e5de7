"""Deployment settings: one ``Settings`` object, nested sections, every field overridable by environment.

Environment names are ``FLYWHEEL_<SECTION>__<FIELD>``, e.g. ``FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS`` or
``FLYWHEEL_LAKE__URI=s3://bucket/lake``. ``FLYWHEEL_HOME`` moves every embedded default at once. Library code
never reads ``os.environ``: it takes a ``Settings`` (or calls :func:`get_settings`).
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    bootstrap_servers: str = Field(default="", description="host:port[,host:port]; empty = embedded broker.")
    topic: str = "flywheel.events"
    dlq_topic: str = "flywheel.events.dlq"
    partitions: int = Field(default=4, ge=1, description="Partitions created for the topics by `stack up`.")
    replication_factor: int = 1
    client_id: str = "flywheel"
    group_id: str = "flywheel-ingest"
    # Tansu hands out partitions only after session_timeout_ms / 2, so keep it short for one machine.
    session_timeout_ms: int = 6_000
    heartbeat_interval_ms: int = 1_000
    request_timeout_ms: int = 10_000
    # kafka-python uses it as the group's rebalance timeout too: how long a rebalance waits for members that
    # were killed. The loop polls at least every commit_interval_s, so 30 s is ample and a crashed member
    # cannot hold the group up for Kafka's default 5 minutes.
    max_poll_interval_ms: int = 30_000
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def librdkafka_config(self, logger: object = None) -> dict[str, object]:
        """The same connection settings in librdkafka's names (confluent-kafka clients); ``logger``: a
        ``logging.Logger`` that librdkafka's own lines go to instead of stderr."""
        cfg: dict[str, object] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
            "socket.timeout.ms": self.request_timeout_ms,
        }
        if logger is not None:
            cfg["logger"] = logger
        if self.sasl_mechanism:
            cfg["sasl.mechanism"] = self.sasl_mechanism
            cfg["sasl.username"] = self.sasl_username
            cfg["sasl.password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for ours, theirs in (("ssl_cafile", "ssl.ca.location"), ("ssl_certfile", "ssl.certificate.location"),
                             ("ssl_keyfile", "ssl.key.location")):
            if getattr(self, ours):
                cfg[theirs] = getattr(self, ours)
        return cfg

    def client_config(self) -> dict[str, object]:
        """Connection settings shared by every kafka-python client (producer, consumer, admin)."""
        cfg: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            cfg["sasl_mechanism"] = self.sasl_mechanism
            cfg["sasl_plain_username"] = self.sasl_username
            cfg["sasl_plain_password"] = self.sasl_password.get_secret_value() if self.sasl_password else None
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                cfg[key] = getattr(self, key)
        return cfg


class LakeSettings(BaseModel):
    uri: str = Field(default="", description="file:///path or s3://bucket/prefix; empty = <home>/lake.")
    s3_endpoint_url: str | None = Field(default=None, description="For MinIO, moto or another S3 API.")
    s3_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None


class MlflowSettings(BaseModel):
    tracking_uri: str = Field(default="", description="Empty = sqlite:///<home>/mlflow.db.")
    artifact_uri: str = Field(default="", description="Empty = <home>/mlartifacts.")


class ApiKey(BaseModel):
    """An API key as stored: its name and the SHA-256 of the secret, never the secret itself."""

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    admin: bool = False
    reviewer: bool = Field(default=False, description="May use the review endpoints and pages (/review).")

    @model_validator(mode="after")
    def _reviewer_name_is_an_id(self) -> ApiKey:
        # a reviewer's name goes into every review event they send (the contract's id format)
        if self.reviewer and not re.fullmatch(r"[A-Za-z0-9._:@/-]{1,128}", self.name):
            raise ValueError(f"a reviewer key's name must be 1-128 letters, digits or . _ : @ / - (got {self.name!r})")
        return self


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    keys: list[ApiKey] = Field(default_factory=list, description="Accepted bearer keys (hashed).")
    rate_per_s: float = Field(default=200.0, gt=0, description="Sustained requests per second per key.")
    rate_burst: int = Field(default=400, ge=1, description="Requests a key may send at once.")
    auth_failure_burst: int = Field(default=20, ge=1, description="Failed authentications one client address "
                                    "may make at once; past them it gets 429 whatever key it sends ...")
    auth_failure_rate_per_s: float = Field(default=5.0, gt=0, description="... until its failures fall back under "
                                           "this many per second.")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    hot_path: bool = Field(default=True, description="Answer POST /v1/feedback in a pure ASGI application in front "
                           "of the framework's middleware, routing and dependency injection (the same checks and "
                           "answers; measured about 1.5x the requests a second). Off: the FastAPI route answers.")
    max_batch: int = Field(default=1_000, ge=1, le=10_000)
    publish_timeout_s: float = Field(default=0.25, gt=0, description="Longest broker ack wait before spooling. "
                                     "Within it, a broker is called stalled once no ack has come back for its "
                                     "usual ack latency plus four deviations (at least 40 ms); the first request "
                                     "to notice opens the breaker and later requests spool at once.")
    spool_dir: str = Field(default="", description="Empty = <home>/spool.")
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    policy_model: str = Field(default="smollm2", description="'smollm2' or a local model directory.")
    policy_version: str = "smollm2-135m-instruct@v1"
    policy_from_registry: bool = Field(default=False, description="Serve models:/flywheel-policy@champion and "
                                       "follow the alias (policy_model/policy_version are then unused).")
    policy_poll_s: float = Field(default=10.0, ge=0, description="How often to check the aliases; 0 = only on reload.")
    canary_share: float = Field(default=0.0, ge=0, le=1, description="Share of chats answered by @challenger.")
    gate_recipe: str = Field(default="gate.yaml", description="Gate recipe POST /v1/admin/promote applies.")
    max_new_tokens: int = Field(default=64, ge=1, le=1024)
    max_prompt_tokens: int = Field(default=2048, ge=1, description="Longest /v1/chat prompt, in tokens after the "
                                   "chat template (422 above it). SmolLM2 reads 8192, but a prompt costs more than "
                                   "in proportion to its length (2048 tokens: ~9 s of prefill and ~0.1 s a reply "
                                   "token on one core, measured), and a quarter of the context leaves room for "
                                   "the reply and for later turns of the conversation.")
    chat_queue_limit: int = Field(default=16, ge=1, description="Chats that may wait for the model; one more is "
                                  "answered 503 'overloaded' with Retry-After at once.")
    chat_timeout_s: float = Field(default=30.0, gt=0, description="A chat still waiting for the model after this "
                                  "long is answered 503 'overloaded' (one that has started runs to its end).")


class IngestSettings(BaseModel):
    commit_every: int = Field(default=20_000, ge=1, description="Flush + commit after this many records (each "
                              "flush writes one file per lake partition, an event type and hour: fewer, larger files "
                              "under load) ...")
    commit_interval_s: float = Field(default=2.0, gt=0, description="... or after this many seconds.")
    poll_timeout_ms: int = 500
    max_poll_records: int = 2_000
    batch_records: int = Field(default=8_000, ge=1, description="The consumer gathers up to this many records "
                               "into one batch (validation costs less per record in larger batches; never more than commit_every) ...")
    batch_wait_ms: int = Field(default=100, ge=0, description="... waiting at most this long after the first "
                               "record of a batch arrived (0: one fetch per batch).")
    max_future_skew_s: float = Field(default=300.0, description="occurred_at may lead the clock by this.")
    max_age_days: float = Field(default=30.0, description="occurred_at older than this is dead-lettered.")
    max_text_chars: int = Field(default=32_000, description="Longest prompt/response/correction kept.")
    metrics_port: int = 9464
    client: Literal["confluent", "kafka-python"] = Field(
        default="confluent", description="The consumer's Kafka client: 'confluent' (librdkafka: fetches and decodes "
        "record batches in C threads) or 'kafka-python' (pure Python).")
    assignment: Literal["group", "manual"] = Field(
        default="group", description="'group': join the consumer group (partitions shared by every member, moved "
        "on rebalances). 'manual': this one consumer takes every partition and commits without joining: for a "
        "deployment that runs exactly one consumer.")
    restart_backoff_s: float = Field(default=0.5, gt=0, description="First wait before restarting the consumer "
                                     "after a broker or storage error; doubles on each failure ...")
    restart_backoff_max_s: float = Field(default=30.0, gt=0, description="... up to this.")
    dedupe_window_h: float = Field(default=48.0, gt=0, description="The same event_id arriving again within "
                                   "this many hours is dropped even with another occurred_at hour (the id index "
                                   "holds the window's ids in memory, about 130 bytes each).")
    dead_letter_dir: str = Field(default="", description="Local dead-letter files (records no broker would take); "
                                 "empty = <home>/dead-letters.")


class CurationSettings(BaseModel):
    blocked_users: list[str] = Field(default_factory=list, description="Accounts whose feedback is held back.")
    blocklist_file: str | None = Field(default=None, description="One blocked user_id per line (# comments).")
    max_feedback_per_minute: int = Field(default=20, description="More from one user in 60 s = a bot.")
    min_read_s: float = Field(default=1.0, description="Feedback sooner than this after the turn = a bot ...")
    read_chars_per_s: float = Field(default=250.0, description="... plus the response length at this speed.")
    brigade_min_accounts: int = Field(default=4, description="Near-identical corrections from this many accounts.")
    brigade_window_h: float = Field(default=6.0, description="... within this many hours = brigading.")
    min_correction_overlap: float = Field(default=0.08, description="Word Jaccard with the response below = unrelated.")
    eval_share: float = Field(default=0.1, ge=0, lt=1, description="Share of prompt groups in the eval split.")
    turn_lookback_h: float = Field(default=24.0, description="How far before the interval to look for turns.")


class ReviewSettings(BaseModel):
    """What each curation run routes to human review (``/review``), and what curation does with the decisions."""

    correction_share: float = Field(default=1.0, ge=0, le=1, description="Share of the corrections that passed "
                                    "the automatic filters routed to review.")
    held_back_share: float = Field(default=0.2, ge=0, le=1, description="Share of the feedback the filters held "
                                   "back routed to review (their precision is measured on it).")
    uncertain_pairs: int = Field(default=20, ge=0, description="Pairs where the champion reward model is least "
                                 "certain or disagrees most with the users' label, routed to review each run.")
    max_items: int = Field(default=500, ge=0, description="Most items one curation run routes (corrections "
                           "first, then the held-back sample, then the uncertain pairs).")
    double_share: float = Field(default=0.2, ge=0, le=1, description="Share of the items that two reviewers "
                                "decide (their agreement is measured on these).")
    unreviewed_corrections: Literal["train", "hold"] = Field(
        default="train", description="Corrections routed to review but not decided yet: 'train' uses them; "
        "'hold' keeps them out of the dataset (quarantine reason awaiting_review) until a reviewer accepts them.")
    min_coverage: float = Field(default=0.0, ge=0, le=1, description="Reward-model retraining waits until this "
                                "share of the routed corrections is reviewed (0 = never waits).")
    lookahead_h: float = Field(default=24.0 * 14, gt=0, description="Decisions made up to this long after an "
                               "interval's end count when it is curated (or curated again).")


class LoopSettings(BaseModel):
    """The continuous loop (Airflow DAGs and ``flywheel demo``): which recipes, how much data, where alerts go."""

    reward_recipe: str = Field(default="reward-minilm.yaml", description="Recipe for reward-model retraining.")
    policy_recipe: str = Field(default="policy-ppo-lora.yaml", description="Recipe for policy retraining.")
    gate_recipe: str = Field(default="gate.yaml", description="Evaluation settings and gate thresholds.")
    train_window_h: float = Field(default=168.0, gt=0, description="Reward model and policy train on this many "
                                  "hours of curated feedback up to the interval end.")
    min_new_pairs: int = Field(default=200, ge=0, description="Retrain the reward model only when the pairs "
                               "curated since its training data end reach this many.")
    policy_from_champion: bool = Field(default=True, description="PPO starts from the serving champion (else "
                                       "from the recipe's base policy).")
    webhook_url: str | None = Field(default=None, description="Failed tasks POST a JSON summary here.")
    airflow_port: int = Field(default=8280, description="`flywheel airflow up`: the Airflow API server port.")


class EmbeddedSettings(BaseModel):
    broker_port: int = 19092


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default=Path.home() / ".flywheel", description="Root of every embedded default.")
    kafka: KafkaSettings = KafkaSettings()
    lake: LakeSettings = LakeSettings()
    mlflow: MlflowSettings = MlflowSettings()
    api: ApiSettings = ApiSettings()
    ingest: IngestSettings = IngestSettings()
    curation: CurationSettings = CurationSettings()
    review: ReviewSettings = ReviewSettings()
    loop: LoopSettings = LoopSettings()
    embedded: EmbeddedSettings = EmbeddedSettings()

    @model_validator(mode="after")
    def _embedded_defaults(self) -> Settings:
        home = self.home.expanduser().resolve()
        self.home = home
        if not self.kafka.bootstrap_servers:
            self.kafka.bootstrap_servers = f"127.0.0.1:{self.embedded.broker_port}"
        if not self.lake.uri:
            self.lake.uri = (home / "lake").as_uri()
        if not self.mlflow.tracking_uri:
            self.mlflow.tracking_uri = f"sqlite:///{home / 'mlflow.db'}"
        if not self.mlflow.artifact_uri:
            self.mlflow.artifact_uri = (home / "mlartifacts").as_uri()
        if not self.api.spool_dir:
            self.api.spool_dir = str(home / "spool")
        if not self.ingest.dead_letter_dir:
            self.ingest.dead_letter_dir = str(home / "dead-letters")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
