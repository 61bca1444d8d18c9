"""Command line: turns options into a Config and errors into one-line messages."""

import functools
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from . import private
from .config import build_config, load_toml, log_level_of, normalize
from .errors import ConfigError, MountError, TieredError, expected
from .mount_options import mount_settings

log = logging.getLogger("tieredfs")


def setup_logging(level: int, log_file: Path | None = None) -> None:
    try:
        if log_file:
            # Often in the cache dir, which is private (private.py); the log names keys.
            if not log_file.parent.is_dir():
                private.make_dir(log_file.parent)
            private.touch(log_file)
        handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    except OSError as e:
        raise ConfigError(f"cannot write the log file {log_file}: {e.strerror}") from None
    handler.setFormatter(logging.Formatter("%(asctime)s level=%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def clear_errors(fn):
    """Expected failures print one line and exit non-zero; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TieredError, BaseExceptionGroup) as e:
            # Raised inside the mount's nursery, an expected failure arrives wrapped by trio.
            if (error := expected(e)) is None:
                raise
            _fail(error)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def _fail(e: TieredError) -> None:
    click.echo(f"tieredfs: error: {e}", err=True)
    sys.exit(2 if isinstance(e, ConfigError) else 1)


class _OneLineGroup(click.Group):
    """Usage errors are one line too, instead of click's usage block and blank line."""

    def main(self, args=None, *rest, **kwargs):
        argv = sys.argv[1:] if args is None else list(args)
        if argv and argv[0].startswith("s3://"):
            from .fstab import main as mount_helper  # fuse3's mount.fuse3 runs `tieredfs SOURCE DIR -o ...`

            return mount_helper(argv)
        try:
            return super().main(argv, *rest, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:
            click.echo(e.format_message(), err=True)
            sys.exit(2)
        except click.exceptions.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            click.echo(f"tieredfs: error: {e.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.exceptions.ClickException as e:
            click.echo(f"tieredfs: error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            sys.exit(130)


@click.group(cls=_OneLineGroup)
@click.version_option(package_name="tieredfs")
def main():
    """tieredfs: mount S3 through local and shared block caches."""


@main.command()
@click.argument("url", required=False)
@click.argument("mountpoint", required=False, type=click.Path(path_type=Path))
@mount_settings
@click.option("-o", "options", multiple=True, help="mount options, comma separated (allow_other,...)")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML settings file")
@click.option("-f", "--foreground", is_flag=True, help="stay attached (systemd, debugging)")
@click.option("--debug", is_flag=True, default=None)
@clear_errors
def mount(url, mountpoint, options, config_file, foreground, **settings):
    """Mount s3://BUCKET[/PREFIX] on MOUNTPOINT (read-only).

    URL and MOUNTPOINT may instead come from the --config file (url = "s3://...",
    mountpoint = "/mnt/x"), as in the systemd unit."""
    import gc

    gc.disable()  # start-up allocates for good (imports, S3 models): service.run re-enables it
    settings["fuse_options"] = [o for group in options for o in group.split(",") if o] or None
    cli_values = normalize(settings | {"mountpoint": mountpoint})
    reread = functools.partial(_load_config, url, config_file, cli_values)
    config = reread()
    # Issue 19: the bucket is checked in another process while this one starts the mount.
    from .bucket_check import BucketCheck, check_bucket

    check = BucketCheck.start(functools.partial(check_bucket, config))
    from . import daemon, service
    from .sdnotify import Notifier
    from .signals import Control
    notifier = Notifier.from_env()
    control = Control(notifier, reread if config_file else None)

    def ready(then=lambda: None) -> None:
        notifier.ready(f"serving s3://{config.bucket}/{config.prefix} on {config.mountpoint}")
        then()

    if foreground:
        setup_logging(log_level_of(config), config.log_file)
        service.run(config, ready, control, check)
        return
    # Problems a user can fix are reported before detaching, with the terminal still attached.
    try:
        service.check_mountpoint(config.mountpoint)
        service.check_fuse()
    except TieredError:
        check.close()
        raise
    log_file = config.log_file or config.effective_cache_dir / "tieredfs.log"
    setup_logging(log_level_of(config), log_file)
    daemon.run_detached(lambda tell: service.run(config, lambda: ready(tell), control, check),
                        str(log_file))


def _load_config(url: str | None, config_file: Path | None, cli_values: dict):
    """The config from its file and the command line (also what a SIGHUP re-reads)."""
    file_values = load_toml(config_file) if config_file else {}
    if "mountpoint" not in cli_values and "mountpoint" not in file_values:
        raise ConfigError("no mount point: give MOUNTPOINT, or mountpoint = \"/mnt/...\" in the config file")
    config = build_config(url, file_values, cli_values)
    config.mountpoint = config.mountpoint.absolute()
    return config


@main.command()
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.option("-z", "--lazy", is_flag=True, help="detach now even if files are open")
@clear_errors
def umount(mountpoint, lazy):
    """Unmount MOUNTPOINT (also a mount whose daemon died)."""
    from . import stale

    if stale.is_dead_mount(mountpoint):
        stale.detach(mountpoint)
        click.echo(f"{mountpoint}: its daemon was gone; detached the dead mount", err=True)
        return
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), str(mountpoint)]
    for attempt in range(5):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise MountError("fusermount3 not found: install the fuse3 package") from None
        # Measured in bench/: about 1 in 50 unmounts right after a mount is ready gets a
        # passing EBUSY; only one that lasts is the user's open files.
        if proc.returncode == 0 or "busy" not in proc.stderr.lower():
            break
        time.sleep(0.2)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown reason"
        hint = " (files are open: close them or use --lazy)" if "busy" in why.lower() else ""
        raise MountError(f"cannot unmount {mountpoint}: {why}{hint}")


@main.command()
@click.argument("mountpoint", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="every counter as JSON")
@click.option("--watch", is_flag=False, flag_value="1", default=None, metavar="[SECONDS]",
              help="live per-second rates every SECONDS (default 1) until Ctrl-C")
@click.option("--count", type=click.IntRange(min=1), help="with --watch: stop after COUNT lines")
@clear_errors
def stats(mountpoint, as_json, watch, count):
    """Show what the daemon serving MOUNTPOINT is doing."""
    from . import stats_view

    if watch is not None:
        seconds, mountpoint = stats_view.watch_args(watch, mountpoint)
        stats_view.watch(mountpoint, seconds, count, sys.stdout)
        return
    if mountpoint is None:
        raise ConfigError("give the MOUNTPOINT of a tieredfs mount")
    snap = stats_view.read_stats(mountpoint)
    click.echo(stats_view.to_json(snap) if as_json else stats_view.table(snap))


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("-r", "--recursive", is_flag=True, help="warm the files under directories too")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="files (or recorded runs) read at once")
@click.option("--replay", type=click.Path(path_type=Path),
              help="preload the blocks a FILE from 'mount --record' lists, in order")
@clear_errors
def warmup(paths, recursive, parallel, replay):
    """Preload files into a running mount's caches (reads through the mount)."""
    from . import warmup as warm

    if replay is not None:
        if len(paths) != 1:
            raise ConfigError("--replay takes one PATH: the mount point to warm")
        plan = warm.plan_replay(replay, paths[0])
    elif not paths:
        raise ConfigError("give the files or directories to warm (or --replay FILE MOUNTPOINT)")
    else:
        plan = warm.plan_paths(list(paths), recursive)
    sys.exit(warm.warm(plan, parallel))


@main.command("pack")
@click.argument("url")
@click.option("--endpoint-url", help="S3 endpoint, e.g. http://127.0.0.1:9000")
@click.option("--region")
@click.option("--max-file-size", default="1M", show_default=True, help="objects up to this size are packed")
@click.option("--pack-size", default="64M", show_default=True, help="bytes per pack object")
@click.option("--parallel", default=64, show_default=True, type=click.IntRange(1, 256),
              help="source objects fetched at once (one GET, one thread each)")
@click.option("--dry-run", is_flag=True, help="say what would be packed; write nothing")
@click.option("--verify", "check", is_flag=True, help="then check every packed file against its source")
@click.option("--gc", is_flag=True, help="then delete index versions and packs no current index needs")
@click.option("--keep-versions", default=2, show_default=True, type=click.IntRange(0),
              help="with --gc: index versions kept before the current one")
@click.option("--gc-grace", default="1h", show_default=True,
              help="with --gc: keep what was superseded or written less than this ago (s, m, h, d)")
@clear_errors
def pack_cmd(url, endpoint_url, region, max_file_size, pack_size, parallel, dry_run, check, gc,
             keep_versions, gc_grace):
    """Pack the small objects under s3://BUCKET[/PREFIX] for fast reads (docs/packs.md)."""
    from . import service
    from .config import parse_size
    from .errors import PackVerifyFailed
    from .packgc import parse_grace
    from .packer import PackOptions

    setup_logging(False)
    # A scheduler's SIGTERM ends the run as Ctrl-C does: its work files are removed on the way
    # out (packwork.work_dir). What it wrote is adopted by the next run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    packs = parse_size(pack_size, "pack-size")
    # An object bigger than a pack is never packed, whatever --max-file-size says.
    options = PackOptions(max_file_size=min(packs, parse_size(max_file_size, "max-file-size")),
                          pack_size=packs, parallel=parallel, dry_run=dry_run)
    if options.max_file_size < 1:
        raise ConfigError("max-file-size and pack-size must be at least 1 byte")
    collect = (keep_versions, parse_grace(gc_grace)) if gc else None
    summary, report, collected = service.pack(url, endpoint_url, region, options, check, collect)
    click.echo(summary.line())
    if collected is not None:
        click.echo(collected.line())
    if report is not None:
        click.echo(report.line())
        if report.bad:
            raise PackVerifyFailed(f"{len(report.bad)} packed files differ from their source, "
                                   f"e.g. {report.bad[0]!r}: re-run tieredfs pack")


@main.command()
@click.option("--mountpoint", type=click.Path(path_type=Path), help="where to mount (default: a temp dir)")
@click.option("--keep", is_flag=True, help="leave the mount and S3 server up until Ctrl-C")
@clear_errors
def demo(mountpoint, keep):
    """Serve a sample dataset from an embedded S3 server, mount it and read it back."""
    from .demo import run_demo

    run_demo(mountpoint, keep)


@main.group()
def cache():
    """Inspect, verify or empty a local cache dir."""


_cache_dir_option = click.option("--cache-dir", required=True, type=click.Path(path_type=Path))


@cache.command("info")
@_cache_dir_option
@clear_errors
def cache_info(cache_dir):
    """Size, blocks, oldest block, and the hit ratio if a daemon is using it."""
    from . import cache_admin

    click.echo(json.dumps(cache_admin.info(cache_dir), indent=2))


@cache.command("clear")
@_cache_dir_option
@click.option("--force", is_flag=True, help="even while a daemon is using it")
@clear_errors
def cache_clear(cache_dir, force):
    """Delete every cached block."""
    from . import cache_admin

    click.echo(f"dropped {cache_admin.clear(cache_dir, force)} blocks from {cache_dir}")


@cache.command("check")
@_cache_dir_option
@click.option("--drop", is_flag=True, help="remove the blocks that fail verification")
@clear_errors
def cache_check(cache_dir, drop):
    """Verify every block against its checksum; exit 1 if any is corrupt and not dropped."""
    from . import cache_admin

    report = cache_admin.check(cache_dir, drop)
    click.echo(json.dumps(report, indent=2))
    if report["corrupt"] and not drop:
        sys.exit(1)


@main.group()
def shared():
    """Inspect, collect or verify a shared directory tier."""


def _shared_layouts(shared_dir: Path, namespace: str | None) -> list:
    from .tiers.shared_format import Layout, namespaces

    if not (shared_dir / "tieredfs-shared.json").exists():
        raise ConfigError(f"{shared_dir} is not a tieredfs shared dir (no tieredfs-shared.json)")
    names = [namespace] if namespace else namespaces(shared_dir)
    layouts = [Layout(shared_dir, n) for n in names]
    for layout in layouts:
        if not layout.blocks.is_dir():
            raise ConfigError(f"namespace {layout.namespace!r} does not exist in {shared_dir}")
    return layouts


def _shared_options(fn):
    fn = click.option("--namespace", help="one namespace (default: all)")(fn)
    return click.option("--shared-dir", required=True, type=click.Path(path_type=Path))(fn)


@shared.command("info")
@_shared_options
@clear_errors
def shared_info(shared_dir, namespace):
    """Blocks and bytes per namespace, from the collector's summary (cheap)."""
    from .tiers import shared_gc

    click.echo(json.dumps([shared_gc.info(layout) for layout in _shared_layouts(shared_dir, namespace)],
                          indent=2))


@shared.command("gc")
@_shared_options
@click.option("--quota", help="evict down to 90% of this (default: the quota the daemons use)")
@clear_errors
def shared_gc_cmd(shared_dir, namespace, quota):
    """One collection pass per namespace; says 'busy' where another collector is running."""
    from .config import parse_size
    from .tiers.shared_format import Perms
    from .tiers.shared_gc import Collector

    out = []
    for layout in _shared_layouts(shared_dir, namespace):
        collector = Collector(layout, Perms(), 0)
        limit = parse_size(quota, "quota") if quota else collector.load_state().get("quota")
        collector.quota = limit if limit is not None else 0
        report = collector.run_pass(evict=limit is not None)
        out.append({"namespace": layout.namespace, **(report or {"busy": True})})
    click.echo(json.dumps(out, indent=2))


@shared.command("check")
@_shared_options
@click.option("--drop", is_flag=True, help="remove the blocks that fail verification")
@clear_errors
def shared_check(shared_dir, namespace, drop):
    """Verify every block file (a full walk); exit 1 if any is corrupt and not dropped."""
    from .tiers import shared_gc

    reports = [shared_gc.check(layout, drop) for layout in _shared_layouts(shared_dir, namespace)]
    click.echo(json.dumps(reports, indent=2))
    if any(r["corrupt"] for r in reports) and not drop:
        sys.exit(1)
