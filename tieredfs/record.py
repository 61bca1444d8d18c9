"""Record which blocks reads ask for, in order, so other nodes can replay them (docs/warmup.md).

The file (recording.py reads it back) is JSON lines: a header, then an object line the first time an object version is
read, then runs of consecutive blocks of it:

    {"tieredfs_record": 1, "bucket": "b", "prefix": "data/", "block_size": 1048576}
    {"object": 0, "key": "data/a.bin", "etag": "9e1...", "size": 5242880}
    [0, 0, 4]            object 0, blocks 0 to 4, read in that order

A block read again right after itself (the kernel asks for a block in several pieces) is
written once. The daemon notes blocks on the trio thread without I/O; a background task
writes them out once a second.
"""

import json
import logging
import os
from pathlib import Path

import trio

from . import private
from .blocks import BlockRef
from .errors import ConfigError
from .recording import FORMAT_VERSION
from .stats import Counters

log = logging.getLogger(__name__)

# Lines noted and not yet written. A disk that falls this far behind ends the recording
# (logged, counted): a file with lines missing in the middle would name objects it never declared.
_MAX_PENDING_LINES = 100_000
_FLUSH_SECONDS = 1.0


class Recorder:
    def __init__(self, path: Path, bucket: str, prefix: str, block_size: int, counters: Counters):
        try:
            # 0600, as the cache dir's files: it names the keys of what may be a private bucket.
            fd = private.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            self._file = open(fd, "w", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot write the record file {path}: {e.strerror}") from None
        self.path = path
        self.counters = counters
        self._objects: dict[tuple[str, str], int] = {}
        self._pending: list[str] = []
        self._run: list[int] | None = None  # [object, first, last] not yet written
        self._written_to: tuple[int, int] | None = None  # (object, block) the last line ended at
        self._overflowed = False
        header = {"tieredfs_record": FORMAT_VERSION, "bucket": bucket, "prefix": prefix,
                  "block_size": block_size}
        self._file.write(json.dumps(header) + "\n")

    def note(self, refs: list[BlockRef]) -> None:
        """The blocks of one read, in order. Trio thread: no I/O here."""
        if self._overflowed:
            return
        for ref in refs:
            obj = self._object_id(ref)
            run = self._run
            if run is not None and run[0] == obj and ref.index in (run[2], run[2] + 1):
                run[2] = ref.index
            elif run is None and self._written_to == (obj, ref.index):
                continue  # a repeat of the block the last flushed run ended with
            else:
                self._close_run()
                self._run = [obj, ref.index, ref.index]

    def _object_id(self, ref: BlockRef) -> int:
        o = ref.obj
        n = self._objects.get((o.key, o.etag))
        if n is None:
            n = self._objects[(o.key, o.etag)] = len(self._objects)
            self._queue(json.dumps({"object": n, "key": o.key, "etag": o.etag, "size": o.size}))
        return n

    def _close_run(self) -> None:
        if self._run is not None:
            self._queue(json.dumps(self._run))
            self.counters.add("blocks", self._run[2] - self._run[1] + 1)
            self._written_to = (self._run[0], self._run[2])
            self._run = None

    def _queue(self, line: str) -> None:
        if len(self._pending) >= _MAX_PENDING_LINES and not self._overflowed:
            self._overflowed = True
            self.counters.add("overflowed")
            log.warning("event=record_stopped file=%s reason=write_backlog lines=%d",
                        self.path, len(self._pending))
        if not self._overflowed:
            self._pending.append(line)

    def _take(self) -> list[str]:
        self._close_run()
        lines, self._pending = self._pending, []
        return lines

    def _write(self, lines: list[str]) -> None:
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    async def run(self) -> None:
        while True:
            await trio.sleep(_FLUSH_SECONDS)
            lines = self._take()
            if lines:
                await trio.to_thread.run_sync(self._write, lines)

    def close(self) -> None:
        """Write what is left (after the trio run ends) and close the file."""
        try:
            self._write(self._take())
        except OSError as e:
            log.warning("event=record_write_failed file=%s error=%r", self.path, e.strerror)
        self._file.close()
        log.info("event=record_closed file=%s objects=%d", self.path, len(self._objects))
