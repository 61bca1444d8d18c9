"""The kernel's limit on a FUSE connection's background requests (fusectl, needs root).

The kernel sends O_DIRECT reads (libfuse asks for async direct I/O) and its own readahead
as "background" requests, and keeps at most `max_background` of them (12 by default) at
the daemon; the rest wait in the kernel. So 12 O_DIRECT readers stalled on S3 held back
every other such read, a read of a file in tier 1 too, however many requests the daemon
could serve (issue 18, head-of-line blocking). Raising it lets those requests reach the
daemon, where S3 is bounded on its own (--s3-max-requests). `congestion_threshold` is left
as it is: above it the kernel drops the async part of its readahead (docs/readahead.md).

The knobs live in /sys/fs/fuse/connections/<device>/, which exists once fusectl is mounted
(systemd does; scripts/dev.sh does on a bare machine).
"""

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

CONNECTIONS = Path("/sys/fs/fuse/connections")


def raise_max_background(st_dev: int, wanted: int) -> None:
    """Blocking (sysfs): call from a worker thread."""
    # The kernel names a connection by its dev_t, (major << 20) | minor.
    knob = CONNECTIONS / str((os.major(st_dev) << 20) | os.minor(st_dev)) / "max_background"
    try:
        current = int(knob.read_text())
        if current < wanted:
            knob.write_text(str(wanted))
    except (OSError, ValueError) as e:
        log.info("event=fuse_max_background_unchanged knob=%s error=%r (needs root and fusectl "
                 "mounted; O_DIRECT reads beyond 12 then queue in the kernel)", knob,
                 getattr(e, "strerror", None) or str(e))
