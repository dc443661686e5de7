import pytest

from ingest.spool import Spool, SpoolFull, read_segment


def test_append_seal_read_remove_in_order(tmp_path):
    spool = Spool(tmp_path, 10_000)
    spool.append([(b"k1", b"v1"), (b"k2", b"v2")])
    first = spool.seal()
    spool.append([(b"k3", b"v3")])
    segments = spool.seal()
    assert segments[0] == first[0] and len(segments) == 2
    assert [r for s in segments for r in read_segment(s)] == [(b"k1", b"v1"), (b"k2", b"v2"), (b"k3", b"v3")]
    for s in segments:
        spool.remove(s)
    assert spool.is_empty() and spool.segments() == []


def test_full_spool_refuses_whole_batches(tmp_path):
    spool = Spool(tmp_path, 64)
    spool.append([(b"k", b"x" * 20)])
    with pytest.raises(SpoolFull):
        spool.append([(b"k", b"y" * 40)])
    assert [r for s in spool.seal() for r in read_segment(s)] == [(b"k", b"x" * 20)]


def test_torn_tail_is_ignored_and_a_new_process_sees_old_segments(tmp_path):
    spool = Spool(tmp_path, 10_000)
    spool.append([(b"a", b"1"), (b"b", b"2")])
    spool.close()
    seg = spool.segments()[0]
    seg.write_bytes(seg.read_bytes()[:-3])  # a crash mid-append
    reopened = Spool(tmp_path, 10_000)
    assert not reopened.is_empty()
    assert list(read_segment(reopened.seal()[0])) == [(b"a", b"1")]


def test_concurrent_appends_share_syncs_and_all_land_in_order_per_caller(tmp_path):
    import threading

    spool = Spool(tmp_path, 10_000_000)
    barrier = threading.Barrier(16)

    def worker(w):
        barrier.wait()
        for i in range(50):
            spool.append([(f"w{w}".encode(), str(i).encode())])

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = [r for s in spool.seal() for r in read_segment(s)]
    assert len(records) == 800
    for w in range(16):
        assert [int(v) for k, v in records if k == f"w{w}".encode()] == list(range(50))
    assert spool.syncs < 800, "concurrent appends should share fsyncs"


def test_a_failed_write_is_cut_back_and_reported_and_later_appends_are_readable(tmp_path, monkeypatch):
    import os

    spool = Spool(tmp_path, 10_000)
    spool.append([(b"a", b"1")])
    real_fsync, calls = os.fsync, []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        spool.append([(b"b", b"2")])
    monkeypatch.setattr(os, "fsync", real_fsync)
    spool.append([(b"c", b"3")])
    assert [r for s in spool.seal() for r in read_segment(s)] == [(b"a", b"1"), (b"c", b"3")]
    assert spool.size_bytes == sum(s.stat().st_size for s in spool.segments())
