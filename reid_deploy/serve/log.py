"""The service's append-only write-ahead log: every add and delete is here, fsynced, before it is acknowledged.

A log is a folder of segment files named by the sequence number of their first record
(``0000000000000001.wal``). A record is ``<u32 length><u32 CRC-32>`` (little-endian) and that many bytes of
JSON; each carries its ``seq``. ``append`` writes a group of records and fsyncs once (group commit).
Replay reads the records after a snapshot's sequence number and stops at the first incomplete or damaged
record of the last segment (a write cut by a crash: never acknowledged), which it cuts off. A snapshot
``rotate``s the log (new appends go to a new segment) and, once the snapshot is on disk, ``drop_through``
removes the segments it holds.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reid_deploy.console import log
from reid_deploy.errors import ModelFileError

HEADER = struct.Struct("<II")
SUFFIX = ".wal"


class WriteAheadLog:
    """The log in ``folder`` (created when missing). Not thread-safe: the service's writer owns it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.last_seq = 0
        self._file = None

    def segments(self) -> list[tuple[int, Path]]:
        """(first sequence number, path) of every segment, in order."""
        found = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                found.append((int(path.stem), path))
            except ValueError:
                continue
        return sorted(found)

    def replay(self, after: int) -> Iterator[dict[str, Any]]:
        """Every record with a sequence number above ``after``, in order; afterwards ``append`` continues the
        log. A torn record at the end of the last segment is cut off (logged); damage elsewhere is an error."""
        segments = self.segments()
        self.last_seq = after
        for n, (_, path) in enumerate(segments):
            for record in self._read(path, last=n == len(segments) - 1):
                if record["seq"] > after:
                    self.last_seq = record["seq"]
                    yield record
                else:
                    self.last_seq = max(self.last_seq, record["seq"])

    def _read(self, path: Path, last: bool) -> Iterator[dict[str, Any]]:
        with open(path, "r+b") as fh:
            data = fh.read()
            offset = 0
            while offset < len(data):
                record, end = _record_at(data, offset)
                if record is None:
                    if not last:
                        raise ModelFileError(f"damaged service log {path} at byte {offset}: restore the index "
                                             f"and its log from a backup")
                    log.warning("service log %s: cut off an incomplete record at byte %d (a write that was "
                                "never acknowledged)", path, offset)
                    fh.truncate(offset)
                    os.fsync(fh.fileno())
                    return
                yield record
                offset = end

    def append(self, records: list[dict[str, Any]]) -> int:
        """Give ``records`` the next sequence numbers, write them and fsync once; returns the last one."""
        if self._file is None:
            self._open_segment()
        chunks = []
        for record in records:
            self.last_seq += 1
            payload = json.dumps({**record, "seq": self.last_seq}, separators=(",", ":")).encode()
            chunks.append(HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._file.write(b"".join(chunks))
        self._file.flush()
        os.fsync(self._file.fileno())
        return self.last_seq

    def rotate(self) -> None:
        """Close the current segment: the next ``append`` starts a new one."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def drop_through(self, seq: int) -> None:
        """Remove the closed segments whose records all have sequence numbers up to ``seq`` (a snapshot
        holds them)."""
        segments = self.segments()
        current = Path(self._file.name) if self._file is not None else None
        for (_, path), (following, _) in zip(segments, segments[1:]):
            if following > seq + 1 or path == current:
                break
            path.unlink()
        _fsync_folder(self.folder)

    def close(self) -> None:
        self.rotate()

    def _open_segment(self) -> None:
        path = self.folder / f"{self.last_seq + 1:016d}{SUFFIX}"
        self._file = open(path, "ab")
        _fsync_folder(self.folder)


def _record_at(data: bytes, offset: int) -> tuple[dict[str, Any] | None, int]:
    """(the record at ``offset``, where the next starts); None when it is incomplete or damaged."""
    if offset + HEADER.size > len(data):
        return None, offset
    length, crc = HEADER.unpack_from(data, offset)
    start, end = offset + HEADER.size, offset + HEADER.size + length
    if end > len(data) or zlib.crc32(data[start:end]) != crc:
        return None, offset
    try:
        return json.loads(data[start:end]), end
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, offset


def _fsync_folder(folder: Path) -> None:
    """Make the folder's entries (a new or removed segment) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
