"""Mounts whose daemon died (kill -9, OOM): detected and detached, so a restart can mount again.

Such a mount stays in the mount table and answers every request with ENOTCONN
("Transport endpoint is not connected"), or ECONNABORTED once the kernel has aborted
the connection. Nothing can be served from it any more, so `tieredfs mount` and
`tieredfs umount` detach it lazily: processes that still hold files in it keep getting
the same errors, and new ones see the directory underneath.
"""

import errno
import os
import subprocess
from pathlib import Path

from .errors import MountError

# A FUSE mount whose daemon died answers ENOTCONN, or ECONNABORTED once the kernel has
# aborted the connection (which of the two depends on the kernel and the timing).
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
        if os.path.ismount(path):
            os.statvfs(path)  # never answered from the kernel's attribute cache, unlike stat
    except OSError as e:
        return e.errno in DEAD_MOUNT_ERRNOS
    return False


def detach(path: Path) -> None:
    """Lazily unmount the dead mount on `path`, saying so; MountError if that fails."""
    try:
        done = subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                              text=True, timeout=30)
    except FileNotFoundError:
        raise MountError("fusermount3 not found: install the fuse3 package") from None
    if done.returncode != 0 or is_dead_mount(path):
        why = done.stderr.strip() or "still not connected"
        raise MountError(f"mount point {path} is a dead mount (its daemon is gone) and "
                         f"cannot be detached: {why}")
