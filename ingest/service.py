"""``flywheel ingest``: the consumer loop wired to Kafka, the lake and the dead-letter topic."""

from __future__ import annotations

import logging
import threading
from functools import partial

from prometheus_client import CollectorRegistry, start_http_server

from flywheel.settings import Settings
from flywheel.storage import open_storage
from ingest.consumer import ConsumerMetrics, KafkaDeadLetters, KafkaSource, run_consumer, validate_records
from ingest.filters import FilterConfig, StreamScreen
from ingest.lake import LakeSink
from ingest.validation import QualityRules

log = logging.getLogger(__name__)


def run_ingest(settings: Settings, stop: threading.Event, *, metrics_port: int | None = None,
               registry: CollectorRegistry | None = None) -> None:
    """Consume the event topic into the lake until ``stop`` is set (or an unexpected error)."""
    registry = registry or CollectorRegistry()
    metrics = ConsumerMetrics(registry)
    if metrics_port:
        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
        log.info("consumer metrics on http://127.0.0.1:%d/metrics", metrics_port)
    cfg = settings.ingest
    source = KafkaSource(settings.kafka, poll_timeout_ms=cfg.poll_timeout_ms, max_poll_records=cfg.max_poll_records)
    dlq = KafkaDeadLetters(settings.kafka)
    sink = LakeSink(open_storage(settings.lake.uri, settings.lake))
    screen = StreamScreen(FilterConfig.from_settings(settings.curation, blocklist_file=False),
                          settings.curation.blocklist_file)
    handle = partial(validate_records, rules=QualityRules.from_settings(cfg), screen=screen)
    log.info("consuming %s into %s", settings.kafka.topic, settings.lake.uri)
    try:
        run_consumer(source, handle, sink, dlq, commit_every=cfg.commit_every,
                     commit_interval_s=cfg.commit_interval_s, stop=stop, metrics=metrics)
    finally:
        source.close()
        dlq.close()
