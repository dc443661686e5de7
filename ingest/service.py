"""``flywheel ingest``: the consumer loop wired to Kafka, the lake and the dead-letter topic, kept running.

The loop itself (``ingest.consumer.run_consumer``) stops at the first error without committing. This module
is its supervisor: a broker outage, a timeout, a failed commit or a storage error closes the Kafka clients
(without committing) and starts them again after a back-off that doubles from ``restart_backoff_s`` up to
``restart_backoff_max_s``; the records since the last commit are replayed and the lake drops the ones it
already has. Only errors that a restart cannot fix (bad configuration, failed authentication) end the
process, as :class:`ConfigurationError` (``flywheel ingest`` then exits 2 and says so).
Every restart counts in ``flywheel_ingest_restarts_total{error=...}``.
"""

from __future__ import annotations

import logging
import threading
import time
from functools import partial
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from flywheel.settings import Settings
from flywheel.storage import open_storage
from ingest.consumer import ConsumerMetrics, KafkaDeadLetters, handle_batch, run_consumer
from ingest.deadletters import LocalDeadLetters
from ingest.filters import FilterConfig, StreamScreen
from ingest.lake import LakeSink
from ingest.sources import ClientFatal, open_source
from ingest.validation import QualityRules

log = logging.getLogger(__name__)


class ConfigurationError(RuntimeError):
    """An error that restarting the consumer cannot fix."""


def is_fatal(error: BaseException) -> bool:
    from kafka.errors import AuthorizationError, KafkaConfigurationError, SaslAuthenticationFailedError

    return isinstance(error, ConfigurationError | KafkaConfigurationError | SaslAuthenticationFailedError
                      | AuthorizationError | ClientFatal)


def dead_letter_file(settings: Settings, name: str) -> Path:
    return Path(settings.ingest.dead_letter_dir) / f"{name}.jsonl"


def run_ingest(settings: Settings, stop: threading.Event, *, metrics_port: int | None = None,
               registry: CollectorRegistry | None = None) -> None:
    """Consume the event topic into the lake until ``stop`` is set; raises only :class:`ConfigurationError`."""
    registry = registry or CollectorRegistry()
    metrics = ConsumerMetrics(registry)
    if metrics_port:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
        log.info("consumer metrics on http://127.0.0.1:%d/metrics", metrics_port)
    cfg = settings.ingest
    try:
        storage = open_storage(settings.lake.uri, settings.lake)
        screen = StreamScreen(FilterConfig.from_settings(settings.curation, blocklist_file=False),
                              settings.curation.blocklist_file)
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"{type(e).__name__}: {e}") from e
    handle = partial(handle_batch, rules=QualityRules.from_settings(cfg), screen=screen)
    local = LocalDeadLetters(dead_letter_file(settings, "ingest"), counter=metrics.dead_letters_parked)
    backoff = cfg.restart_backoff_s
    log.info("consuming %s into %s (%s, %s assignment)", settings.kafka.topic, settings.lake.uri, cfg.client,
             cfg.assignment)
    while not stop.is_set():
        started = time.monotonic()
        source = dlq = None
        try:
            source = open_source(settings.kafka, client=cfg.client, poll_timeout_ms=cfg.poll_timeout_ms,
                                 max_poll_records=cfg.max_poll_records, assignment=cfg.assignment,
                                 batch_records=min(cfg.batch_records, cfg.commit_every), batch_wait_ms=cfg.batch_wait_ms)
            dlq = KafkaDeadLetters(settings.kafka, local=local)
            run_consumer(source, handle, LakeSink(storage, dedupe_window_h=cfg.dedupe_window_h), dlq, commit_every=cfg.commit_every,
                         commit_interval_s=cfg.commit_interval_s, stop=stop, metrics=metrics, background_writes=True)
            return
        except Exception as e:
            if is_fatal(e):
                raise ConfigurationError(f"{type(e).__name__}: {e}") from e
            metrics.restarts.labels(type(e).__name__).inc()
            if time.monotonic() - started > 60:  # it ran fine for a while: start the back-off afresh
                backoff = cfg.restart_backoff_s
            log.warning("consumer stopped (%s: %s); restarting in %.1f s (records since the last commit are "
                        "replayed, nothing is lost)", type(e).__name__, e, backoff)
        finally:
            for client in (source, dlq):
                if client is not None:
                    try:
                        client.close()
                    except Exception as e:  # a client that cannot even close cleanly is simply dropped
                        log.debug("closing %s failed: %s", type(client).__name__, e)
        stop.wait(backoff)
        backoff = min(backoff * 2, cfg.restart_backoff_max_s)
