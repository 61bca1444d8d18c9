"""The cache dir is as private as the mount: 0700 directories, 0600 files.

A cached block is a private bucket's bytes; with the default umask any local user could read
them, even where the mount itself is not `allow_other`. What the mount shows is set apart
(--file-mode, --dir-mode).
"""

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dir(path: Path) -> None:
    """Create `path` (and missing parents) with the last component 0700; an existing one is
    left as its owner set it, with a warning if others may read it."""
    path = Path(path)
    if path.is_dir():
        warn_if_shared(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        pass


def warn_if_shared(path: Path) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077:
        log.warning("event=cache_dir_not_private dir=%s mode=%04o action=none "
                    "hint='other users may read cached bytes: chmod 700 %s'", path, mode, path)


def open_file(path: Path, flags: int) -> int:
    """os.open creating the file 0600 (an existing file keeps its mode)."""
    return os.open(path, flags, FILE_MODE)


def touch(path: Path) -> None:
    """Create the file 0600 if it is missing (before another library opens it)."""
    os.close(open_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND))
