"""How the daemon answers signals, and what a SIGHUP may change while the mount serves.

SIGTERM and SIGINT unmount (systemd's stop, Ctrl-C). SIGHUP re-reads the config file
and applies the settings that are safe to change live; any other change is logged as
ignored, to take effect at the next restart.
"""

import logging
import signal
from dataclasses import dataclass, field
from typing import Callable

import trio

from .config import Config, log_level_of
from .errors import TieredError
from .sdnotify import Notifier

log = logging.getLogger(__name__)

# Settings a SIGHUP applies live; every other field is fixed for the life of the mount.
RELOADABLE = ("log_level", "debug", "list_ttl")


_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def hold() -> None:
    """Keep these signals pending from the mount until watch() handles them: their default
    action would kill the daemon and leave a dead mount."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)


@dataclass
class Control:
    """What the supervisor (systemd, the CLI) hands the daemon."""

    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    reread: Callable[[], Config] | None = None  # the config rebuilt from its file, for SIGHUP


async def watch(stop: Callable[[], None], control: Control, current: Config,
                apply: Callable[[Config], None]) -> None:
    """Serve signals until one asks to stop; then call `stop` (the mount drains and unmounts)."""
    with trio.open_signal_receiver(*_HANDLED) as signals:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        async for sig in signals:
            if sig == signal.SIGHUP:
                current = await _reload(control, current, apply)
                continue
            log.info("event=signal signal=%s action=unmount", signal.Signals(sig).name)
            control.notifier.stopping(f"unmounting {current.mountpoint}")
            stop()
            return


async def _reload(control: Control, current: Config, apply: Callable[[Config], None]) -> Config:
    if control.reread is None:
        log.info("event=signal signal=SIGHUP action=none reason=no_config_file")
        return current
    control.notifier.reloading()
    try:
        new = await trio.to_thread.run_sync(control.reread)
    except TieredError as e:
        log.warning("event=reload_failed error=%r action=kept_settings", str(e))
        control.notifier.send(ready=1, status=f"reload failed, old settings kept: {e}")
        return current
    changed, ignored = diff(current, new)
    live = _merge(current, new, changed)
    apply(live)
    log.info("event=reloaded changed=%s ignored=%s", ",".join(changed) or "none",
             ",".join(ignored) or "none")
    if ignored:
        log.warning("event=reload_ignored settings=%s reason=needs_restart", ",".join(ignored))
    control.notifier.send(ready=1, status=f"serving {live.mountpoint}")
    return live


def diff(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(reloadable settings that changed, other settings that changed)."""
    changed, ignored = [], []
    for name, value in vars(new).items():
        if getattr(old, name) != value:
            (changed if name in RELOADABLE else ignored).append(name.replace("_", "-"))
    return changed, ignored


def _merge(old: Config, new: Config, changed: list[str]) -> Config:
    merged = Config(**vars(old))
    for name in changed:
        attr = name.replace("-", "_")
        setattr(merged, attr, getattr(new, attr))
    return merged


def apply_log_level(config: Config) -> None:
    logging.getLogger().setLevel(log_level_of(config))
