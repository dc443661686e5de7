"""The local dead-letter file: what is parked can be read back whole, with its reason, and is listed by the CLI."""

from __future__ import annotations

import hashlib
import json

from prometheus_client import CollectorRegistry, Counter

from flywheel.app import cli
from flywheel.settings import get_settings
from ingest.deadletters import LocalDeadLetters, read_parked


def test_parked_records_round_trip_with_reason_size_and_hash(tmp_path):
    counter = Counter("parked_total", "", ["reason"], registry=CollectorRegistry())
    local = LocalDeadLetters(tmp_path / "x.jsonl", counter=counter)
    local.park(b"k", b"\x00\xff" * 10, "too_large", "d" * 10_000, {"topic": "t", "partition": 1, "offset": 7})
    local.park(None, b"v", "MessageSizeTooLargeError", "no", {"spool_segment": "segment-000000001.log"})
    with open(tmp_path / "x.jsonl", "ab") as f:
        f.write(b'{"torn')  # a crash mid-append
    first, second = read_parked(tmp_path / "x.jsonl")
    assert (first.key, first.value, first.reason, first.size) == (b"k", b"\x00\xff" * 10, "too_large", 20)
    assert first.sha256 == hashlib.sha256(b"\x00\xff" * 10).hexdigest() and len(first.detail) == 4000
    assert first.source == {"topic": "t", "partition": 1, "offset": 7}
    assert second.key is None and second.value == b"v"
    assert counter.labels("too_large")._value.get() == 1


def test_the_cli_lists_both_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        home = get_settings().ingest.dead_letter_dir
        LocalDeadLetters(f"{home}/ingest.jsonl").park(b"k", b"x", "invalid_json", "bad", {"offset": 1})
        LocalDeadLetters(f"{home}/spool.jsonl").park(b"k", b"y" * 5, "MessageSizeTooLargeError", "big", {})
        assert cli.main(["dead-letters", "--json"]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["reason"], r["size"]) for r in lines] == [("invalid_json", 1), ("MessageSizeTooLargeError", 5)]
    finally:
        get_settings.cache_clear()


def test_only_errors_a_restart_cannot_fix_stop_the_consumer():
    from kafka.errors import (
        CommitFailedError,
        KafkaConfigurationError,
        KafkaConnectionError,
        KafkaTimeoutError,
        SaslAuthenticationFailedError,
        TopicAuthorizationFailedError,
    )

    from ingest.service import ConfigurationError, is_fatal

    assert all(is_fatal(e) for e in (ConfigurationError("x"), KafkaConfigurationError("x"),
                                      SaslAuthenticationFailedError("x"), TopicAuthorizationFailedError("x")))
    assert not any(is_fatal(e) for e in (KafkaTimeoutError("x"), KafkaConnectionError("x"), CommitFailedError("x"),
                                         OSError("disk"), RuntimeError("rebalance")))
