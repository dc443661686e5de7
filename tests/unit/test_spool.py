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
