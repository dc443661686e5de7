import uuid
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from flywheel import events as ev
from flywheel.storage import LocalStorage, open_storage
from ingest.lake import LakeSink, file_name, read_events

T = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)


def test_local_put_is_atomic_and_listable(tmp_path):
    s = LocalStorage(tmp_path)
    s.put_bytes("a/b/c.bin", b"one")
    s.put_bytes("a/b/c.bin", b"two")
    assert s.get_bytes("a/b/c.bin") == b"two"
    assert s.list("a/") == ["a/b/c.bin"] and s.exists("a/b/c.bin")
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="escapes"):
        s.put_bytes("../outside", b"x")


def test_open_storage_rejects_unknown_schemes(tmp_path):
    assert isinstance(open_storage(tmp_path.as_uri()), LocalStorage)
    with pytest.raises(ValueError, match="unsupported storage URI"):
        open_storage("ftp://host/x")


class NoDlq:
    """A dead-letter sink for records that are all valid."""

    def send(self, *a):
        raise AssertionError("nothing here is invalid")

    def flush(self):
        pass


def thumbs(eid=None, at=T, conv="c1"):
    return ev.validate_event({"type": "thumbs", "event_id": eid or str(uuid.uuid4()), "occurred_at": at.isoformat(),
                              "conversation_id": conv, "user_id": "u", "model_version": "v",
                              "response_id": "r", "value": "up"})


def test_sink_partitions_by_type_and_hour_and_names_files_by_offsets(tmp_path):
    storage = LocalStorage(tmp_path)
    sink = LakeSink(storage)
    sink.add(thumbs(), "events", 0, 10)
    sink.add(thumbs(at=T.replace(hour=11)), "events", 0, 11)
    stats = sink.flush()
    assert stats.written == 2
    assert stats.files == [
        f"events/type=thumbs/dt=2026-11-22/hour=10/{file_name('events', 0, 10, 11)}",
        f"events/type=thumbs/dt=2026-11-22/hour=11/{file_name('events', 0, 10, 11)}",
    ]


def test_replayed_offsets_and_client_retries_give_one_row_per_event_id(tmp_path):
    storage = LocalStorage(tmp_path)
    a, b, c = thumbs(), thumbs(), thumbs()
    sink = LakeSink(storage)
    for off, e in enumerate([a, b]):
        sink.add(e, "events", 0, off)
    sink.flush()
    # a new consumer (empty index) replays offsets 0..2 after a crash before commit; c is new,
    # and a client retry of b arrives again at offset 3
    sink2 = LakeSink(storage)
    for off, e in enumerate([a, b, c, b]):
        sink2.add(e, "events", 0, off)
    stats = sink2.flush()
    assert (stats.written, stats.duplicates) == (1, 3)
    df = read_events(storage, "thumbs")
    assert sorted(df["event_id"]) == sorted(str(e.event_id) for e in (a, b, c))
    physical = sum(len(pq.read_table(p)) for p in (tmp_path / "events").rglob("*.parquet"))
    assert physical == 3


def test_identical_replay_rewrites_the_same_file_with_the_same_rows(tmp_path):
    storage = LocalStorage(tmp_path)
    events = [thumbs() for _ in range(3)]
    for attempt in range(2):
        sink = LakeSink(storage)
        for off, e in enumerate(events):
            sink.add(e, "events", 1, 100 + off)
        stats = sink.flush()
        assert (stats.written, stats.replayed, stats.duplicates) == ((3, 0, 0) if attempt == 0 else (0, 3, 0))
    assert len(list((tmp_path / "events").rglob("*.parquet"))) == 1
    assert len(read_events(storage, "thumbs")) == 3


def test_a_flush_of_several_kafka_partitions_writes_one_file_per_lake_partition_in_offset_order(tmp_path):
    """Rows of four Kafka partitions, buffered out of order, land in one file per lake partition, sorted by
    (partition, offset); the same ranges replayed in another order rewrite those files with the same bytes."""
    storage = LocalStorage(tmp_path)
    events = {(p, off): thumbs(at=T.replace(hour=10 + off % 2)) for p in range(4) for off in range(5)}
    written = {}
    for attempt, order in enumerate((sorted(events), sorted(events, reverse=True))):
        sink = LakeSink(storage)
        for p, off in order:
            sink.add(events[(p, off)], "events", p, off)
        stats = sink.flush()
        assert (stats.written, stats.replayed, stats.duplicates) == ((20, 0, 0) if attempt == 0 else (0, 20, 0))
        assert len(stats.files) == 2 and all(".k4-" in f for f in stats.files)
        for f in stats.files:
            if attempt == 0:
                written[f] = (tmp_path / f).read_bytes()
            else:
                assert (tmp_path / f).read_bytes() == written[f]
    table = pq.read_table(tmp_path / stats.files[0])
    rows = list(zip(table.column("kafka_partition").to_pylist(), table.column("kafka_offset").to_pylist(), strict=True))
    assert rows == sorted(rows) and {p for p, _ in rows} == {0, 1, 2, 3}
    assert len(list((tmp_path / "events").rglob("*.parquet"))) == 2
    assert len(list((tmp_path / "_index").rglob("*.parquet"))) == 1
    assert len(read_events(storage, "thumbs")) == 20


def test_a_replay_with_other_batch_boundaries_across_partitions_keeps_one_row_per_event_id(tmp_path):
    """A consumer crashed after writing a two-partition flush and before committing; its successor polls the
    same records in other batches (one partition at a time, then both with more): nothing is written twice
    and the new records land."""
    storage = LocalStorage(tmp_path)
    first = {(p, off): thumbs(conv=f"c{p}") for p in range(2) for off in range(4)}
    sink = LakeSink(storage)
    for (p, off), e in first.items():
        sink.add(e, "events", p, off)
    assert sink.flush().written == 8
    more = {(p, 4 + off): thumbs(conv=f"c{p}") for p in range(2) for off in range(2)}
    replay = LakeSink(storage)
    for off in range(3):
        replay.add(first[(0, off)], "events", 0, off)
    stats = replay.flush()
    assert (stats.written, stats.duplicates) == (0, 3)
    for (p, off), e in {**first, **more}.items():
        if p == 1 or off >= 3:
            replay.add(e, "events", p, off)
    stats = replay.flush()
    assert (stats.written, stats.duplicates) == (4, 5)
    df = read_events(storage, "thumbs")
    assert sorted(df["event_id"]) == sorted(str(e.event_id) for e in {**first, **more}.values())
    assert sum(len(pq.read_table(f)) for f in (tmp_path / "events").rglob("*.parquet")) == 12


def test_a_replay_with_other_boundaries_fills_the_index_a_crash_left_out(tmp_path):
    """A flush's data files were written and its index was not (a crash between the two). The successor replays
    with another batch boundary, so other file names: the ids it finds in the lake's files get their index
    entries, and a retry of one of them an hour later (another hour partition) is still dropped."""
    class IndexFails(LocalStorage):
        def put_many(self, items):
            if any(k.startswith("_index/") for k, _ in items):
                raise OSError("crash before the index")
            super().put_many(items)

    x, y, z = thumbs(conv="c0"), thumbs(conv="c1"), thumbs(conv="c1")
    sink = LakeSink(IndexFails(tmp_path))
    sink.add(x, "events", 0, 0)
    sink.add(y, "events", 1, 0)
    with pytest.raises(OSError, match="crash before the index"):
        sink.flush()
    storage = LocalStorage(tmp_path)
    successor = LakeSink(storage)
    for e, p, off in ((x, 0, 0), (y, 1, 0), (z, 1, 1)):
        successor.add(e, "events", p, off)
    stats = successor.flush()
    assert (stats.written, stats.duplicates) == (1, 2)
    retry = ev.validate_event({**x.model_dump(mode="json"), "occurred_at": T.replace(hour=12).isoformat()})
    later = LakeSink(storage)  # a new consumer: its dedupe window comes from the index alone
    later.add(retry, "events", 0, 1)
    assert later.flush().duplicates == 1
    assert sum(len(pq.read_table(f)) for f in (tmp_path / "events").rglob("*.parquet")) == 3
    assert sorted(read_events(storage, "thumbs")["event_id"]) == sorted(str(e.event_id) for e in (x, y, z))


def test_an_identical_replay_never_takes_a_row_out_of_its_file(tmp_path):
    """The same offsets replayed after a crash, where a filter now holds one event back (its account was blocked
    in between): the file of that name is written again with every row it had, and the held copy is not added
    to the quarantine area (one row per event_id)."""
    storage = LocalStorage(tmp_path)
    events = [thumbs() for _ in range(3)]
    for attempt in range(2):
        sink = LakeSink(storage)
        for off, e in enumerate(events):
            sink.add(e, "events", 1, 100 + off, held="blocked_account" if attempt and off == 1 else None)
        sink.flush()
    assert sorted(read_events(storage, "thumbs")["event_id"]) == sorted(str(e.event_id) for e in events)
    assert read_events(storage, "thumbs", held="blocked_account").empty


def test_read_events_filters_by_interval(tmp_path):
    storage = LocalStorage(tmp_path)
    sink = LakeSink(storage)
    for off, hour in enumerate([9, 10, 11]):
        sink.add(thumbs(at=T.replace(hour=hour)), "events", 0, off)
    sink.flush()
    got = read_events(storage, "thumbs", T.replace(hour=10, minute=0), T.replace(hour=11, minute=0))
    assert list(got["occurred_at"].dt.hour) == [10]
    assert read_events(storage, "turn").empty


def test_held_events_go_to_the_quarantine_area_exactly_once_and_are_counted(tmp_path):
    """The consumer loop with a screen: held events are written whole under quarantine/reason=..., not to the
    event tables; a replay of the same offsets adds nothing."""
    import json
    import threading

    from ingest.consumer import Held, Record, run_consumer, validate_records
    from ingest.filters import FilterConfig, StreamScreen
    from ingest.lake import count_events, held_reasons
    from ingest.validation import QualityRules

    good, bad = thumbs(at=T), ev.validate_event({**thumbs(at=T).model_dump(mode="json"), "user_id": "mallory"})
    records = [Record("events", 0, i, None, json.dumps(e.model_dump(mode="json")).encode()) for i, e in enumerate([good, bad])]
    screen = StreamScreen(FilterConfig(blocked_users=frozenset({"mallory"})))
    verdicts = validate_records(records, QualityRules(), now=T, screen=screen)
    assert verdicts[0][1] == good and verdicts[1][1] == Held(bad, "blocked_account")

    class Source:
        def __init__(self):
            self.batches, self.committed = [records], {}

        def poll(self):
            if not self.batches:
                stop.set()
                return []
            return self.batches.pop()

        def commit(self, offsets):
            self.committed.update(offsets)

        def on_rebalance(self, revoked, assigned):
            pass

    storage = LocalStorage(tmp_path)
    for _replay in range(2):
        stop, source = threading.Event(), Source()
        run_consumer(source, lambda recs: validate_records(recs, QualityRules(), now=T, screen=screen),
                     LakeSink(storage), NoDlq(), commit_every=100, commit_interval_s=60, stop=stop)
        assert source.committed == {("events", 0): 2}
    assert read_events(storage, "thumbs")["event_id"].tolist() == [str(good.event_id)]
    assert held_reasons(storage) == ["blocked_account"]
    quarantined = read_events(storage, "thumbs", held="blocked_account")
    assert quarantined[["event_id", "user_id"]].values.tolist() == [[str(bad.event_id), "mallory"]]
    assert count_events(storage)["thumbs"] == 2


def test_the_same_event_id_in_another_hour_gives_one_row(tmp_path):
    """A client retry whose occurred_at the server stamped an hour or more later lands in another hour
    partition; the id index still keeps one row, for a new consumer as for the same one."""
    storage = LocalStorage(tmp_path)
    first = thumbs()
    retry = thumbs(eid=str(first.event_id), at=T + timedelta(hours=2))
    sink = LakeSink(storage)
    sink.add(first, "events", 0, 0)
    sink.flush()
    sink.add(retry, "events", 0, 1)
    assert (sink.flush().written, LakeSink(storage).flush().written) == (0, 0)
    fresh = LakeSink(storage)  # another process: its window is loaded from the index files
    fresh.add(retry, "events", 0, 1)
    fresh.add(thumbs(at=T + timedelta(hours=3)), "events", 0, 2)
    stats = fresh.flush()
    assert (stats.written, stats.duplicates) == (1, 1)
    ids = [r["event_id"] for p in (tmp_path / "events").rglob("*.parquet") for r in pq.read_table(p).to_pylist()]
    assert len(ids) == len(set(ids)) == 2


def test_the_cross_hour_guarantee_holds_over_the_window_and_the_index_is_compacted(tmp_path):
    storage = LocalStorage(tmp_path)
    now = [datetime(2026, 11, 22, 10, 30, tzinfo=UTC)]
    sink = LakeSink(storage, dedupe_window_h=24, clock=lambda: now[0])
    first = thumbs()
    sink.add(first, "events", 0, 0)
    sink.flush()
    for off in range(1, 4):  # more flushes in the same arrival hour: several index files
        sink.add(thumbs(), "events", 0, off)
        sink.flush()
    assert len(storage.list("_index/event_ids/dt=2026-11-22/hour=10/")) == 4
    now[0] += timedelta(hours=23)  # still inside the window: the retry is dropped
    sink.add(thumbs(eid=str(first.event_id), at=T + timedelta(hours=5)), "events", 0, 10)
    assert sink.flush().duplicates == 1
    assert len(storage.list("_index/event_ids/dt=2026-11-22/hour=10/")) == 1, "a past hour is compacted"
    assert LakeSink(storage, dedupe_window_h=24, clock=lambda: now[0])._recent_ids(
        datetime(2026, 11, 23, 9, tzinfo=UTC)).get(str(first.event_id)), "compaction kept the ids"
    now[0] += timedelta(hours=3)  # outside the window: the old hour's index is gone, and the id with it
    sink.add(thumbs(eid=str(first.event_id), at=T + timedelta(hours=7)), "events", 0, 11)
    assert sink.flush().written == 1
    assert storage.list("_index/event_ids/dt=2026-11-22/hour=10/") == []


def test_a_flush_that_fails_midway_keeps_its_buffer_and_the_retry_is_exact(tmp_path):
    """The disk fills after the first data file of a flush: the flush raises (the consumer does not commit), no
    file is torn, and the same sink's retry writes every event once, the one already written included."""
    storage = LocalStorage(tmp_path)
    sink = LakeSink(storage)
    events = [thumbs(at=T.replace(hour=h)) for h in (8, 9, 10, 11)]
    for off, e in enumerate(events):
        sink.add(e, "events", 0, off)
    real = storage.put_many
    calls = []

    def full_disk(items):
        calls.append(len(items))
        if len(calls) == 1:
            real(items[:1])
            raise OSError(28, "No space left on device")
        real(items)

    storage.put_many = full_disk
    with pytest.raises(OSError, match="No space"):
        sink.flush()
    assert len(sink) == 4 and not any(p.name.startswith(".tmp-") for p in tmp_path.rglob("*"))
    stats = sink.flush()
    assert (stats.written, stats.duplicates, stats.replayed) == (3, 0, 1)
    assert sorted(read_events(storage, "thumbs")["event_id"]) == sorted(str(e.event_id) for e in events)
    assert sum(len(pq.read_table(p)) for p in (tmp_path / "events").rglob("*.parquet")) == 4


def test_put_many_writes_every_object_whole(tmp_path):
    s = LocalStorage(tmp_path)
    s.put_many([(f"d{i % 3}/k{i}.bin", bytes([i]) * 100) for i in range(12)])
    assert [s.get_bytes(f"d{i % 3}/k{i}.bin") for i in range(12)] == [bytes([i]) * 100 for i in range(12)]


def test_the_consumer_flushes_and_commits_as_soon_as_it_has_caught_up(tmp_path):
    """A poll that comes back empty means the topic is drained: what the loop holds is made durable and committed
    then, not after commit_interval_s (here an hour) or commit_every records; without flush_when_idle it waits
    for the loop to stop."""
    import json
    import threading

    from ingest.consumer import Record, run_consumer, validate_records
    from ingest.validation import QualityRules

    records = [Record("events", 0, i, None, json.dumps(thumbs(at=T).model_dump(mode="json")).encode()) for i in range(3)]

    class Source:
        def __init__(self, stop):
            self.polls, self.commits, self.stop = [records, []], [], stop

        def poll(self):
            if not self.polls:  # the poll after the empty one: stop the loop
                self.stop.set()
                return []
            return self.polls.pop(0)

        def commit(self, offsets):
            self.commits.append(("stopping" if self.stop.is_set() else "running", dict(offsets)))

        def on_rebalance(self, revoked, assigned):
            pass

    for idle, when in ((True, "running"), (False, "stopping")):
        stop = threading.Event()
        source, sink = Source(stop), LakeSink(LocalStorage(tmp_path / str(idle)))
        run_consumer(source, lambda recs: validate_records(recs, QualityRules(), now=T), sink, NoDlq(),
                     commit_every=1_000, commit_interval_s=3600, stop=stop, flush_when_idle=idle)
        assert source.commits == [(when, {("events", 0): 3})]
        assert len(read_events(LocalStorage(tmp_path / str(idle)), "thumbs")) == 3


class _Polls:
    """A source that hands out ``batches`` of thumbs records (partition 0, consecutive offsets), then stops the
    loop; ``on_poll(i)`` runs before poll i and may call the revoke callback; commits are recorded."""

    def __init__(self, stop, batches, per_batch, on_poll=None):
        import json

        from ingest.consumer import Record

        self.stop, self.commits, self.revoked, self.on_poll, self.polled = stop, [], None, on_poll, 0
        self.batches = [[Record("events", 0, b * per_batch + i, None,
                                json.dumps(thumbs(at=T).model_dump(mode="json")).encode())
                         for i in range(per_batch)] for b in range(batches)]

    def poll(self):
        if self.on_poll:
            self.on_poll(self.polled)
        self.polled += 1
        if not self.batches:
            self.stop.set()
            return []
        return self.batches.pop(0)

    def commit(self, offsets):
        self.commits.append(dict(offsets))

    def on_rebalance(self, revoked, assigned):
        self.revoked = revoked


class _SlowSink(LakeSink):
    """Writes take ``delay_s``; ``fail_on`` (1-based) makes that write raise after sleeping."""

    def __init__(self, storage, delay_s=0.05, fail_on=None):
        super().__init__(storage)
        self.delay_s, self.fail_on, self.writes, self.writing, self.finished = delay_s, fail_on, 0, False, 0

    def write(self, buffered):
        import time

        self.writes += 1
        self.writing = True
        try:
            time.sleep(self.delay_s)
            if self.writes == self.fail_on:
                raise OSError(28, "No space left on device")
            return super().write(buffered)
        finally:
            self.writing = False
            self.finished += 1


def _consume(source, sink, stop, **kw):
    from ingest.consumer import run_consumer, validate_records
    from ingest.validation import QualityRules

    run_consumer(source, lambda recs: validate_records(recs, QualityRules(), now=T), sink, NoDlq(),
                 commit_every=100, commit_interval_s=3600, stop=stop, background_writes=True, **kw)


def test_background_writes_commit_each_range_in_order_and_only_once_it_is_durable(tmp_path):
    """The writer thread writes one buffer while the loop polls the next; every commit covers only records whose
    rows are already in the lake, commits only go forward, and the end state is every record exactly once."""
    import threading

    storage, stop = LocalStorage(tmp_path), threading.Event()
    sink = _SlowSink(storage)
    overlapped = []
    source = _Polls(stop, batches=10, per_batch=50, on_poll=lambda i: overlapped.append(sink.writing))
    durable_at_commit = []
    real_commit = source.commit

    def commit(offsets):
        durable_at_commit.append(len(read_events(storage, "thumbs")))
        real_commit(offsets)

    source.commit = commit
    _consume(source, sink, stop)
    ends = [c[("events", 0)] for c in source.commits]
    assert ends == sorted(set(ends)) and ends[-1] == 500
    assert all(durable >= end for durable, end in zip(durable_at_commit, ends, strict=True))
    assert any(overlapped), "no poll ran while a write was in flight: the writes were not in the background"
    ids = read_events(storage, "thumbs")["event_id"]
    assert len(ids) == ids.nunique() == 500


def test_a_background_write_that_fails_stops_the_loop_uncommitted_and_leaves_no_writer_behind(tmp_path):
    import threading

    storage, stop = LocalStorage(tmp_path), threading.Event()
    sink = _SlowSink(storage, delay_s=0.2, fail_on=2)
    source = _Polls(stop, batches=10, per_batch=50)
    with pytest.raises(OSError, match="No space"):
        _consume(source, sink, stop)
    assert sink.finished == sink.writes == 2, "the loop returned while a write was still running"
    assert not [t for t in threading.enumerate() if t.name.startswith("lake-writer")]
    assert source.commits == [{("events", 0): 100}], "only the range the first write made durable is committed"
    assert len(read_events(storage, "thumbs")) == 100


def test_a_revoke_while_a_write_is_in_flight_waits_for_it_and_hands_over_everything(tmp_path):
    import threading

    storage, stop = LocalStorage(tmp_path), threading.Event()
    sink = _SlowSink(storage, delay_s=0.3)
    handed = []

    def revoke_when_writing(i):
        if i == 3:  # 150 records polled; the first 100 are being written in the background
            assert sink.writing
            handed.append((source.revoked(), len(read_events(storage, "thumbs"))))

    source = _Polls(stop, batches=4, per_batch=50, on_poll=revoke_when_writing)
    _consume(source, sink, stop)
    assert handed == [({("events", 0): 150}, 150)]
    ids = read_events(storage, "thumbs")["event_id"]
    assert len(ids) == ids.nunique() == 200


def test_a_broker_error_while_a_write_is_in_flight_returns_only_after_the_write(tmp_path):
    import threading

    storage, stop = LocalStorage(tmp_path), threading.Event()
    sink = _SlowSink(storage, delay_s=0.3)

    def broker_gone(i):
        if i == 3 and sink.writing:
            raise ConnectionError("broker gone")

    source = _Polls(stop, batches=10, per_batch=50, on_poll=broker_gone)
    with pytest.raises(ConnectionError):
        _consume(source, sink, stop)
    assert sink.writes == sink.finished == 1 and source.commits == []
    assert len(read_events(storage, "thumbs")) == 100  # written, not committed: the replay will skip them
