from itertools import islice

from pipelines.sharegpt import chat_samples, iter_records


def test_records_decode_one_by_one_from_the_truncated_file():
    first = list(islice(iter_records(), 3))
    assert all("conversations" in r for r in first)
    assert sum(1 for _ in iter_records()) == 17_671  # the torn last record is skipped, not fatal


def test_chat_samples_are_deterministic_and_bounded():
    a, b = chat_samples(20), chat_samples(20)
    assert a == b and len(a) == 20
    assert all(8 <= len(s.prompt) <= 600 and s.reply for s in a)
