"""A local, fsynced, append-only spool for events the broker could not acknowledge in time.

Records go into numbered segment files (``segment-<n>.log``), each frame ``[len:u32][crc32:u32]`` then a body of
``[key_len:u32][key][value]``. ``append`` returns only after ``fsync``, so an event the API answered 202 for survives a
crash of the API process. The drainer reads closed segments in order and deletes each one only after the
broker acknowledged all of its records. A frame torn by a crash mid-append fails its length or CRC check
and is skipped with everything after it in that segment: it was never acknowledged to a client.

Appends from concurrent requests share one write and one ``fsync`` (group commit): while one thread syncs,
the others queue their frames and the next sync takes them all, so a burst of requests during a broker
outage costs a few syncs, not one each. A write that fails (disk full) is cut back off the segment, every
caller in that group gets the error (the API's 503), and the next append starts a new segment.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class SpoolFull(RuntimeError):
    """The spool reached its size limit: the API answers 503."""


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._synced = threading.Condition(self._lock)
        self._file: Any = None  # open segment being appended to
        self._current: Path | None = None
        self._size = sum(p.stat().st_size for p in self.segments())
        self._queue: list[bytes] = []  # frames waiting for the next group write
        self._queued_bytes = 0
        self._next_ticket = 0  # tickets handed to appenders
        self._done_ticket = 0  # every ticket up to this one is written (or failed)
        self._failed: dict[int, BaseException] = {}  # ticket -> the error its group write raised
        self._writing = False
        self.syncs = 0  # fsync calls (group commit makes this far fewer than appends)

    @property
    def size_bytes(self) -> int:
        return self._size

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("segment-*.log"))

    def is_empty(self) -> bool:
        return self._size == 0

    def _next_path(self) -> Path:
        existing = self.segments()
        n = int(existing[-1].stem.split("-")[1]) + 1 if existing else 1
        return self.dir / f"segment-{n:09d}.log"

    def append(self, records: list[tuple[bytes, bytes]]) -> None:
        """Append ``(key, value)`` records durably, all or nothing. Raises :class:`SpoolFull`, or the
        ``OSError`` of a failed write (nothing of this call is then in the spool)."""
        frames = b"".join(_frame(k, v) for k, v in records)
        with self._lock:
            if self._size + self._queued_bytes + len(frames) > self.max_bytes:
                raise SpoolFull(f"spool holds {self._size} bytes; limit is {self.max_bytes}")
            self._queue.append(frames)
            self._queued_bytes += len(frames)
            self._next_ticket += 1
            ticket = self._next_ticket
            while self._done_ticket < ticket:
                if self._writing:
                    self._synced.wait()
                    continue
                self._write_group()
            error = self._failed.pop(ticket, None)
        if error is not None:
            raise error

    def _write_group(self) -> None:
        """Write and sync everything queued (called with the lock held; releases it during the I/O)."""
        batch, last = b"".join(self._queue), self._next_ticket
        first = self._done_ticket + 1
        self._queue, self._queued_bytes, self._writing = [], 0, True
        self._lock.release()
        error: BaseException | None = None
        try:
            if self._file is None:
                self._current = self._next_path()
                self._file = open(self._current, "ab")  # noqa: SIM115 - kept open across appends
            start = self._file.tell()
            try:
                self._file.write(batch)
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                error = e
                self._cut_back(start)
        except OSError as e:
            error = e
        finally:
            self._lock.acquire()
            self._writing = False
            if error is None:
                self._size += len(batch)
                self.syncs += 1
            else:
                self._failed.update((t, error) for t in range(first, last + 1))
            self._done_ticket = last
            self._synced.notify_all()

    def _idle(self) -> None:
        """Wait (lock held) until no group write is in flight."""
        while self._writing:
            self._synced.wait()

    def _cut_back(self, start: int) -> None:
        """After a failed write: drop the partial frames, close the segment (the next append opens another)."""
        # a torn tail that stays (the truncate failed too) is skipped by read_segment, and nothing follows it
        with contextlib.suppress(OSError):
            self._file.truncate(start)
            os.fsync(self._file.fileno())
        with contextlib.suppress(OSError):
            self._file.close()
        self._file, self._current = None, None

    def seal(self) -> list[Path]:
        """Close the open segment so new appends start a new one; returns every sealed segment, oldest first."""
        with self._lock:
            self._idle()
            if self._file is not None:
                self._file.close()
                self._file = None
                self._current = None
                dir_fd = os.open(self.dir, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            return self.segments()

    def remove(self, segment: Path) -> None:
        """Delete a drained segment."""
        with self._lock:
            self._idle()
            if segment == self._current:
                raise ValueError("cannot remove the open segment; seal() first")
            size = segment.stat().st_size
            segment.unlink()
            self._size -= size

    def close(self) -> None:
        with self._lock:
            self._idle()
            if self._file is not None:
                self._file.close()
                self._file = None


def _frame(key: bytes, value: bytes) -> bytes:
    body = struct.pack(">I", len(key)) + key + value
    return struct.pack(">II", len(body), zlib.crc32(body)) + body


def read_segment(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Yield ``(key, value)`` frames in order; stops at the first torn or corrupt frame."""
    data = path.read_bytes()
    pos = 0
    while pos + 8 <= len(data):
        length, crc = struct.unpack_from(">II", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or zlib.crc32(body) != crc:
            return
        (key_len,) = struct.unpack_from(">I", body, 0)
        yield body[4 : 4 + key_len], body[4 + key_len :]
        pos += 8 + length
