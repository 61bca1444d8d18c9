"""Reading a file written by `mount --record` (record.py; format in docs/warmup.md).

Apart from record.py so that `tieredfs warmup` does not import the daemon's machinery (trio).
"""

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ReplayRefused

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RecordedObject:
    key: str
    etag: str
    size: int


@dataclass
class Recording:
    bucket: str
    prefix: str
    block_size: int
    objects: list[RecordedObject]
    runs: list[tuple[int, int, int]]  # (object, first block, last block), in the order read


def load(path: Path) -> Recording:
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except OSError as e:
        raise ReplayRefused(f"cannot read the replay file {path}: {e.strerror}") from None
    try:
        header = json.loads(lines[0]) if lines else {}
        if header.get("tieredfs_record") != FORMAT_VERSION:
            raise ValueError("not a tieredfs record file (version 1)")
        rec = Recording(header["bucket"], header["prefix"], int(header["block_size"]), [], [])
        for n, line in enumerate(lines[1:], start=2):
            item = json.loads(line)
            if isinstance(item, dict):
                if item["object"] != len(rec.objects):
                    raise ValueError(f"line {n}: objects out of order")
                rec.objects.append(RecordedObject(item["key"], item["etag"], int(item["size"])))
            else:
                obj, first, last = map(int, item)
                if not (0 <= obj < len(rec.objects) and 0 <= first <= last):
                    raise ValueError(f"line {n}: bad run {item}")
                rec.runs.append((obj, first, last))
    except (ValueError, KeyError, TypeError) as e:
        raise ReplayRefused(f"{path} is not a usable replay file: {e}") from None
    return rec
