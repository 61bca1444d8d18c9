"""mount(8)'s side: `/etc/fstab` lines and `mount -t fuse.tieredfs SOURCE DIR -o OPTIONS`.

How mount reaches tieredfs (util-linux 2.38 libmount, fuse3 3.14 mount.fuse3):
- For type `fuse.tieredfs` mount(8) runs `/sbin/mount.fuse.tieredfs` if it exists, else
  `/sbin/mount.fuse` (fuse3's mount.fuse3), always as `HELPER SOURCE DIR [-sfnv] -o OPTS`.
- mount.fuse3 drops user, nouser, users, auto, noauto, nofail and _netdev, adds dev and suid
  (unless nodev / nosuid), and runs `/bin/sh -c "tieredfs SOURCE DIR -o OPTS"` from $PATH.
So `tieredfs s3://... DIR -o ...` and the `mount.tieredfs` console script (for a symlink
/sbin/mount.fuse.tieredfs) both land here. Options use the names of the command line and
the config file (endpoint_url=..., cache-dir=...); mount's generic options are dropped.
"""

import sys

import click

# mount(8)'s own options: done by mount or systemd, or the defaults of a FUSE mount already.
_GENERIC = {"defaults", "auto", "noauto", "_netdev", "nofail", "user", "users", "nouser", "owner",
            "group", "rw", "dev", "suid", "exec", "async", "relatime", "loud", "silent"}
_GENERIC_PREFIXES = ("x-", "comment=")
# Passed on to the kernel mount as `-o` (config.py validates them).
_FUSE = {"ro", "allow_other", "allow_root", "default_permissions", "noatime", "nodev", "nosuid"}
_OWN = {"config", "log_level"}  # key=value options besides the mount settings


def main(argv: list[str] | None = None) -> None:
    """The mount.tieredfs console script: SOURCE DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE]."""
    from .cli import main as cli

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        command, fake = translate(args)
    except click.UsageError as e:
        click.echo(f"mount.tieredfs: error: {e.format_message()}", err=True)
        sys.exit(2)  # mount(8)'s "system error" status is 2 as well: nothing was mounted
    if fake:
        return  # mount -f: do everything but the mount
    cli.main(command, prog_name="tieredfs")


def translate(args: list[str]) -> tuple[list[str], bool]:
    """mount(8)'s helper arguments -> (`tieredfs mount ...` arguments, fake)."""
    from .mount_options import MOUNT_SETTINGS

    positional, options, sloppy, fake = [], [], False, False
    it = iter(args)
    for arg in it:
        if arg in ("-o", "-t", "-N"):
            value = next(it, None)
            if value is None:
                raise click.UsageError(f"{arg} needs a value")
            if arg == "-o":
                options += [o for o in value.split(",") if o]
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnvi"):
            sloppy |= "s" in arg
            fake |= "f" in arg
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise click.UsageError("usage: mount.tieredfs s3://BUCKET[/PREFIX] MOUNTPOINT [-o OPTIONS]")
    command, fuse = ["mount", *positional], []
    for opt in options:
        key, eq, value = opt.partition("=")
        name = key.replace("-", "_")
        if opt in _GENERIC or opt.startswith(_GENERIC_PREFIXES):
            continue
        if opt in _FUSE or key == "fsname":
            fuse.append(opt)
        elif eq and (name in MOUNT_SETTINGS or name in _OWN):
            command += [f"--{name.replace('_', '-')}", value]
        elif not sloppy:
            raise click.UsageError(f"unknown mount option {opt!r} (settings are written "
                                   f"like endpoint_url=URL, cache_dir=DIR)")
    return command + (["-o", ",".join(fuse)] if fuse else []), fake
