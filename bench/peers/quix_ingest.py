"""The peer of ``flywheel ingest`` for ``bench/ingest.py``: a quixstreams pipeline doing the same work.

    <quixstreams venv>/bin/python bench/peers/quix_ingest.py BOOTSTRAP TOPIC EVENTS OUT_DIR

Runs in its own virtual environment (quixstreams pins pydantic and confluent-kafka versions the project does not
use); ``bench/ingest.py`` creates it. The pipeline: a consumer group from the earliest offset, each record's bytes
decoded and validated by the project's own event contract (``flywheel.events.decode_event``, the same pydantic
models), the validated event as a row, and quixstreams' ``LocalFileSink`` writing Parquet (at-least-once: one
file per batch, written in place, no deduplication), committing as it goes. Prints one JSON line:
``{"events": n, "seconds": t, "join_s": j}``, timed from the first record to the commit after the last.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

from quixstreams import Application
from quixstreams.sinks.community.file.local import LocalFileSink

from flywheel.events import decode_event


def main() -> None:
    bootstrap, topic_name, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    app = Application(broker_address=bootstrap, consumer_group=f"quix-{uuid.uuid4().hex[:8]}",
                      auto_offset_reset="earliest", commit_interval=2.0, loglevel="WARNING",
                      auto_create_topics=False, use_changelog_topics=False)
    topic = app.topic(topic_name, value_deserializer="bytes", key_deserializer="bytes")
    sdf = app.dataframe(topic)
    state = {"first": None, "seen": 0}

    def validate(value: bytes) -> dict:
        if state["first"] is None:
            state["first"] = time.perf_counter()
        state["seen"] += 1
        event = decode_event(value)
        return {"event_id": str(event.event_id), "type": event.type, "occurred_at": event.occurred_at.isoformat(),
                "event": event.model_dump_json()}

    sdf = sdf.apply(validate)
    sdf.sink(LocalFileSink(directory=out, format="parquet"))
    started = time.perf_counter()
    app.run(count=n, timeout=300)  # stops after n records, once they are processed and committed
    done = time.perf_counter()
    print(json.dumps({"events": state["seen"], "seconds": done - (state["first"] or started),
                      "join_s": (state["first"] or done) - started}))


if __name__ == "__main__":
    main()
