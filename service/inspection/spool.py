"""A local, durable, bounded spool: the inspection log's write-ahead queue.

Records (bytes, one JSON object each) are appended to segment files `<n>.seg`, one line per
record framed as `<crc32 hex> <record>` and a newline, and fsync'd before `append` returns (the file,
and the folder when a segment is created). A checkpoint (`checkpoint.json`, replaced
atomically) says up to where records have been shipped; fully shipped segments are
deleted. On open, the spool is recovered and reading resumes from the checkpoint, so
everything appended and not yet shipped is replayed.

Failures never cost an acknowledged record:

- **A write the disk refuses** (full, EIO, a file-size limit): segments are written through
  an unbuffered descriptor (`os.pwrite` at the spool's recorded end), so nothing of a failed
  append lingers in a buffer; the segment is cut back to its last good end (ftruncate,
  fsync) and `append` raises. When that cut fails too, every later `append` raises until
  it succeeds: nothing is acknowledged on top of the failed write's bytes.
- **A damaged record** (a byte changed on disk): reading skips that record alone and
  resynchronises at the next valid frame (the next line that unframes, or a frame that
  ends the damaged line when its newline was the damaged byte). The damaged bytes are set
  aside in `damaged-records.jsonl` in the spool folder (segment, offset, base64 bytes,
  reason; once each), counted (`anomaly_inspection_rows_total{outcome="damaged"}`) and
  logged at ERROR.
- **A crash mid-write**: recovery cuts off only the torn tail of the last segment (the
  bytes after its last newline that hold no valid frame); a record that passes its
  checksum is never deleted: a last line whose frame checks out but whose newline is
  missing or damaged gets its newline back (fsync'd), and only what follows it is cut.
  The last record of an older segment whose newline is damaged is read as a record too.
- **A checkpoint that cannot be right** (its segment is not there, or its offset is past
  the end of the file or not on a frame boundary): the spool replays from its oldest
  segment and deletes nothing. Duplicates are harmless (rows carry a unique `record_id`
  and are inserted once); a skipped record would be lost.

One process owns a spool folder at a time (an exclusive `flock` on `LOCK`). Appends come
from one writer thread, reads and commits from one shipper; a lock guards the positions.
The spool is bounded: an append that would hold more than `max_bytes` unshipped raises
`SpoolFull` and writes nothing.

This module is longer than most (about 470 lines): the frame format, the writer's cut-back and
the reader's recovery are one on-disk contract, and the rules above hold only if the writer
and the reader agree on every byte; kept together, they are read and tested side by side
(tests/service/test_spool.py damages, truncates and fills real segment files).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import re
import threading
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from anomaly.durable import fsync_dir, write_atomic
from service import metrics

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
CHECKPOINT = "checkpoint.json"
DAMAGED = "damaged-records.jsonl"
_FRAME_START = re.compile(rb"[0-9a-f]{8} ")  # what `_frame` puts before a record


class SpoolFull(Exception):
    """The spool holds `max_bytes` of unshipped records already."""


@dataclass(frozen=True, order=True)
class Position:
    """A place in the spool: segment number and byte offset in it."""

    segment: int
    offset: int


def _frame(record: bytes) -> bytes:
    return b"%08x " % zlib.crc32(record) + record + b"\n"


def _unframe(line: bytes) -> bytes | None:
    """The record in a complete framed line, or None when the frame is damaged."""
    if len(line) < 10 or line[8:9] != b" " or not line.endswith(b"\n"):
        return None
    record = line[9:-1]
    try:
        crc = int(line[:8], 16)
    except ValueError:
        return None
    return record if zlib.crc32(record) == crc else None


def _parse(line: bytes) -> tuple[int, bytes | None]:
    """A line read from a segment: how many damaged bytes it starts with, and its record.

    A good line is `(0, record)`, a damaged one `(len(line), None)`, unless a valid frame
    ends it (the damaged byte was the newline before that frame, joining two lines): then
    `(where that frame starts, its record)`.
    """
    record = _unframe(line)
    if record is not None:
        return 0, record
    for start in _FRAME_START.finditer(line, 1):
        record = _unframe(line[start.start():])
        if record is not None:
            return start.start(), record
    if not line.endswith(b"\n"):  # the end of a segment: its newline missing, or damaged
        for fixed in (line + b"\n", line[:-1] + b"\n"):
            damaged, record = _parse(fixed)
            if record is not None:
                return damaged, record
    return len(line), None


def _terminated(tail: bytes) -> int | None:
    """Where the newline of a valid frame in `tail` (bytes after a segment's last newline)
    belongs, or None when no frame there checks out.

    The newline may be missing (`len(tail)`), or damaged and followed by nothing, by a few
    bytes of a torn write, or by a torn frame's header. Latest first; the CRC decides.
    """
    ends = {len(tail)} | {len(tail) - k for k in range(1, 11)}
    ends |= {m.start() - 1 for m in _FRAME_START.finditer(tail, 1)}
    for end in sorted((e for e in ends if e >= 9), reverse=True):
        if _parse(tail[:end] + b"\n")[1] is not None:
            return end
    return None


class Spool:
    """See the module docstring.

    Args:
        folder: the spool folder (created if needed).
        max_bytes: most bytes of unshipped records held.
        segment_bytes: size after which a new segment file is started.
    """

    def __init__(self, folder: Path, max_bytes: int, segment_bytes: int = 4 << 20) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.pending_bytes = 0  # appended and not yet shipped
        self._lock = threading.Lock()
        self._lockfile = None
        self._fd: int | None = None  # the last segment, unbuffered
        self._write = Position(0, 0)  # end of what has been appended (and fsync'd)
        self._shipped = Position(0, 0)
        self._unclean = False  # a failed write's bytes may follow `_write`: appends are refused
        self._set_aside: set[tuple[int, int, int]] = set()  # (segment, offset, crc32) in DAMAGED

    def _segment(self, n: int) -> Path:
        return self.folder / f"{n:012d}{SEGMENT_SUFFIX}"

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.folder.glob(f"*{SEGMENT_SUFFIX}")
                      if p.stem.isascii() and p.stem.isdigit())

    def open(self) -> None:
        """Lock the folder, recover the torn tail, check the checkpoint, count the unshipped bytes.

        Raises:
            RuntimeError: another process holds this spool.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lockfile = (self.folder / "LOCK").open("a")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockfile.close()
            raise RuntimeError(f"inspection spool {self.folder} is in use by another process; give each "
                               "server its own ANOMALY_INSPECTION_SPOOL_DIR") from exc
        try:
            data = json.loads((self.folder / CHECKPOINT).read_text())
            checkpoint: Position | None = Position(int(data["segment"]), int(data["offset"]))
        except FileNotFoundError:
            checkpoint = None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("inspection spool %s: unreadable checkpoint (%s); replaying every segment",
                        self.folder, exc)
            checkpoint = None
        self._set_aside = self._load_set_aside()
        segments = self._segments()
        if not segments:
            segments = [max(checkpoint.segment, 0) if checkpoint else 0]
            self._segment(segments[0]).touch()
            fsync_dir(self.folder)
        last = segments[-1]
        good = self._recover(self._segment(last))
        self._shipped = self._valid_checkpoint(checkpoint, segments)
        for n in segments:
            if n < self._shipped.segment:  # shipped, left by a crash between commit and delete
                self._segment(n).unlink(missing_ok=True)
        self._write = Position(last, good)
        self._fd = os.open(self._segment(last), os.O_WRONLY)
        self._unclean = False
        self.pending_bytes = max(0, self._bytes_between(self._shipped, self._write))
        if self.pending_bytes:
            log.info("inspection spool %s: %d bytes not yet shipped; replaying", self.folder,
                     self.pending_bytes)

    def _valid_checkpoint(self, checkpoint: Position | None, segments: list[int]) -> Position:
        """The checkpoint when it names a frame boundary of a segment there; else the oldest
        segment's start (replay, never skip)."""
        oldest = Position(segments[0], 0)
        if checkpoint is None:
            return oldest
        why = ""
        if checkpoint.segment not in segments:
            why = f"its segment {checkpoint.segment} is not in the spool"
        else:
            path = self._segment(checkpoint.segment)
            size = path.stat().st_size
            if not 0 <= checkpoint.offset <= size:
                why = f"its offset {checkpoint.offset} is outside {path.name} ({size} bytes)"
            elif checkpoint.offset:
                with path.open("rb") as f:
                    f.seek(checkpoint.offset - 1)
                    if f.read(1) != b"\n":
                        why = f"its offset {checkpoint.offset} is inside a record of {path.name}"
        if not why:
            return checkpoint
        log.warning("inspection spool %s: the checkpoint cannot be right (%s); replaying from the oldest "
                    "segment (records shipped already are inserted once)", self.folder, why)
        return oldest

    @staticmethod
    def _recover(path: Path) -> int:
        """Cut the torn tail (an incomplete last line) off `path`; returns the new length.

        Only bytes after the last newline can go, and only those that hold no valid frame:
        a last line whose frame checks out but whose newline is missing or damaged is a
        complete record; its newline is restored (durably) and only what follows it is cut.
        Damaged lines before it stay; reading sets them aside.
        """
        size = path.stat().st_size
        good, end = 0, size
        with path.open("rb") as f:
            while end > 0:
                start = max(0, end - (64 << 10))
                f.seek(start)
                newline = f.read(end - start).rfind(b"\n")
                if newline >= 0:
                    good = start + newline + 1
                    break
                end = start
            f.seek(good)
            tail = f.read(size - good)
        end_of_frame = _terminated(tail) if tail else None
        if end_of_frame is not None:
            log.warning("inspection spool: the last record of %s checks out but its newline is %s; "
                        "restoring the newline (the record is kept)", path.name,
                        "missing" if end_of_frame == len(tail) else "damaged")
            with path.open("r+b") as f:
                f.seek(good + end_of_frame)
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
            good += end_of_frame + 1
            size = max(size, good)
        if good < size:
            log.warning("inspection spool: cutting a torn write (%d bytes after the last complete line) "
                        "off the end of %s (a crash mid-append; it was never acknowledged)", size - good,
                        path.name)
            with path.open("r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return good

    def append(self, records: list[bytes]) -> None:
        """Append records and fsync them.

        Raises:
            SpoolFull: they do not fit in `max_bytes` (nothing is written).
            OSError: the disk refused (nothing acknowledged; the segment is cut back to its
                last good end, or, if even that fails, appends are refused until it can be).
        """
        assert self._fd is not None, "open() the spool first"
        data = b"".join(_frame(r) for r in records)
        with self._lock:
            if self.pending_bytes + len(data) > self.max_bytes:
                raise SpoolFull(f"{self.pending_bytes} bytes of decisions not yet shipped "
                                f"(limit {self.max_bytes})")
            end = self._write
        if self._unclean:
            self._cut_back(end)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                written = os.pwrite(self._fd, view[done:], end.offset + done)
                if written <= 0:
                    raise OSError(errno.EIO, "the disk accepted no bytes")
                done += written
            os.fsync(self._fd)
        except BaseException:
            self._cut_back(end)
            raise
        with self._lock:
            self._write = Position(end.segment, end.offset + len(data))
            self.pending_bytes += len(data)
        if self._write.offset >= self.segment_bytes:
            self._roll()

    def _cut_back(self, end: Position) -> None:
        """Cut the segment back to `end` (after a failed write) and make that durable.

        Raises:
            OSError: it could not be; appends stay refused until a later call succeeds.
        """
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, end.offset)
            os.fsync(self._fd)
        except OSError as exc:
            self._unclean = True
            log.error("inspection spool: cannot cut %s back to its last good end (byte %d) after a failed "
                      "write: %s; refusing appends until it can", self._segment(end.segment).name,
                      end.offset, exc)
            raise OSError(exc.errno, f"inspection spool {self._segment(end.segment).name} cannot be cut "
                          f"back to its last good end after a failed write ({exc}); appends are refused "
                          "until it can") from exc
        if self._unclean:
            log.info("inspection spool: %s is back at its last good end; appending again",
                     self._segment(end.segment).name)
        self._unclean = False

    def _roll(self) -> None:
        """Start the next segment; if the disk refuses, keep appending to this one."""
        assert self._fd is not None
        nxt = self._write.segment + 1
        try:
            fd = os.open(self._segment(nxt), os.O_WRONLY | os.O_CREAT, 0o666)
        except OSError as exc:
            log.error("inspection spool: cannot start segment %s (%s); appending to the current one",
                      self._segment(nxt).name, exc)
            return
        try:
            fsync_dir(self.folder)
        except OSError as exc:
            os.close(fd)
            log.error("inspection spool: cannot make segment %s durable (%s); appending to the current one",
                      self._segment(nxt).name, exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)
        with self._lock:
            self._write = Position(nxt, 0)

    def read(self, start: Position | None, max_records: int) -> tuple[list[bytes], Position]:
        """Up to `max_records` durable records after `start` (default: the checkpoint).
        A damaged record is set aside (see the module docstring) and skipped alone.

        Returns:
            The records and the position after the last one (pass it to `commit` once they
            are shipped, or back to `read` to continue).

        Raises:
            OSError: a damaged record could not be set aside (nothing is skipped).
        """
        with self._lock:
            pos = start or self._shipped
            end = self._write
        records: list[bytes] = []
        while len(records) < max_records and pos < end:
            limit = end.offset if pos.segment == end.segment else self._size(pos.segment)
            offset = pos.offset
            if offset < limit:
                with self._segment(pos.segment).open("rb") as f:
                    f.seek(offset)
                    while len(records) < max_records and offset < limit:
                        line = f.readline(limit - offset)
                        if not line:  # shorter than it was: nothing more to read there
                            offset = limit
                            break
                        damaged, record = _parse(line)
                        if damaged:
                            self._set_aside_damaged(pos.segment, offset, line, damaged, record is not None)
                        if record is not None:
                            records.append(record)
                        offset += len(line)
            if offset >= limit and pos.segment < end.segment:
                pos = Position(pos.segment + 1, 0)
            else:
                pos = Position(pos.segment, offset)
        return records, pos

    def _load_set_aside(self) -> set[tuple[int, int, int]]:
        keys: set[tuple[int, int, int]] = set()
        try:
            lines = (self.folder / DAMAGED).read_bytes().splitlines()
        except FileNotFoundError:
            return keys
        for line in lines:
            try:
                entry = json.loads(line)
                keys.add((int(entry["segment"]), int(entry["offset"]),
                          zlib.crc32(base64.b64decode(entry["bytes"], validate=True))))
            except (ValueError, KeyError, TypeError):
                continue  # a torn entry: its record is set aside again
        return keys

    def _set_aside_damaged(self, segment: int, offset: int, line: bytes, damaged: int,
                           resynced: bool) -> None:
        """Keep the damaged bytes at `offset` of `segment` in DAMAGED (once), count and log them."""
        data = line[:damaged]
        key = (segment, offset, zlib.crc32(data))
        if key in self._set_aside:
            return
        if resynced:
            reason = "damaged record whose newline was damaged too; the record after it is kept"
        elif not line.endswith(b"\n"):
            reason = "incomplete record at the end of a finished segment"
        else:
            reason = "the record fails its CRC-32 check"
        entry = {"segment": segment, "offset": offset, "length": len(data),
                 "bytes": base64.b64encode(data).decode("ascii"), "reason": reason,
                 "at": datetime.now(timezone.utc).isoformat()}
        with (self.folder / DAMAGED).open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a torn entry from a crash: start a new line
                    f.write(b"\n")
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._set_aside.add(key)
        metrics.INSPECTION_ROWS.labels("damaged").inc()
        log.error("inspection spool: damaged record in %s at byte %d (%d bytes: %s); set aside in %s, the "
                  "records after it are shipped", self._segment(segment).name, offset, len(data), reason,
                  self.folder / DAMAGED)

    def commit(self, position: Position) -> None:
        """Everything before `position` is shipped: checkpoint it, delete finished segments."""
        with self._lock:
            if position <= self._shipped:
                return
            shipped = self._bytes_between(self._shipped, position)
            old = self._shipped
            self._shipped = position
            self.pending_bytes = max(0, self.pending_bytes - shipped)
        write_atomic(self.folder / CHECKPOINT, json.dumps({"segment": position.segment,
                                                           "offset": position.offset}))
        for n in range(old.segment, position.segment):
            self._segment(n).unlink(missing_ok=True)

    def _bytes_between(self, a: Position, b: Position) -> int:
        if a.segment == b.segment:
            return b.offset - a.offset
        total = self._size(a.segment) - a.offset
        for n in range(a.segment + 1, b.segment):
            total += self._size(n)
        return total + b.offset

    def _size(self, n: int) -> int:
        try:
            return self._segment(n).stat().st_size
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        """Close the segment and release the folder lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lockfile is not None:
            self._lockfile.close()
            self._lockfile = None
