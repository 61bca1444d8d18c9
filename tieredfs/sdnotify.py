"""systemd's readiness protocol (sd_notify): a datagram of KEY=VALUE lines to $NOTIFY_SOCKET.

The whole protocol is these few lines (an '@' names an abstract socket), so no library:
the PyPI `sdnotify` package does the same with no release since 2017. Without a
NOTIFY_SOCKET (not under systemd) every call does nothing.
"""

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None):
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None

    @classmethod
    def from_env(cls) -> "Notifier":
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def send(self, **fields: str | int) -> None:
        if not self.address:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self.address)
        except OSError as e:
            # systemd gone or the socket not ours: the mount itself is unaffected.
            log.warning("event=notify_failed socket=%r error=%r", self.address, e.strerror)

    def status(self, text: str) -> None:
        self.send(status=text)

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def stopping(self, status: str) -> None:
        self.send(stopping=1, status=status)

    def reloading(self) -> None:
        # systemd 253+ pairs RELOADING=1 with the time it was sent, on CLOCK_MONOTONIC.
        self.send(reloading=1, status="reloading the config file",
                  monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
