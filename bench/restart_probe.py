"""Can a new pyfuse3 process take over a live FUSE mount from an old one? (docs/restart.md)

The old daemon (bench/nullfs.py's filesystem) mounts; a reader opens a file and reads it.
The old daemon then starts its successor with the /dev/fuse descriptor inherited and
exits without unmounting (the connection lives while any process holds the descriptor),
as a restart through systemd's fd store would. The successor hands libfuse `/dev/fd/N`
as its mount point, which libfuse 3.14 accepts. The probe then reads through the file the
reader kept open, and through a new open, and prints what each one got.

Run as root: python -m bench.restart_probe
"""

import errno
import os
import subprocess
import sys
import tempfile
import time

import pyfuse3
import trio

from .nullfs import NullFS

_OPTIONS = {"fsname=probe", "ro"}


def _fuse_fd() -> int:
    """pyfuse3 does not expose the session's descriptor: find the open /dev/fuse."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            pass
    raise RuntimeError("no /dev/fuse descriptor")


def _old(mountpoint: str, handover: str) -> None:
    pyfuse3.init(NullFS({"f": 1 << 20}, keep_cache=False), mountpoint, _OPTIONS)

    async def serve_until_handover():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            while not os.path.exists(handover):
                await trio.sleep(0.05)
            fd = _fuse_fd()
            os.set_inheritable(fd, True)
            subprocess.Popen([sys.executable, "-m", "bench.restart_probe", "new", str(fd)],
                             pass_fds=(fd,))
            time.sleep(1.0)  # the successor holds the descriptor before we let go of ours
            os._exit(0)  # no unmount, no fuse_session_destroy: as a crash or an exec would

    trio.run(serve_until_handover)


def _new(fd: int) -> None:
    pyfuse3.init(NullFS({"f": 1 << 20}, keep_cache=False), f"/dev/fd/{fd}", _OPTIONS)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def _outcome(fn) -> str:
    try:
        return f"ok ({len(fn())} bytes)"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def probe() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mnt, handover = os.path.join(tmp, "mnt"), os.path.join(tmp, "handover")
        os.mkdir(mnt)
        old = subprocess.Popen([sys.executable, "-m", "bench.restart_probe", "old", mnt, handover])
        try:
            while not os.path.ismount(mnt):
                time.sleep(0.05)
            fd = os.open(os.path.join(mnt, "f"), os.O_RDONLY)
            print("before handover, read of the open file:", _outcome(lambda: os.pread(fd, 4096, 0)))
            open(handover, "w").close()
            old.wait(30)
            time.sleep(1.0)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            print("after handover, read of the open file:", _outcome(lambda: os.pread(fd, 4096, 0)))
            print("after handover, stat of the mount point:", _outcome(lambda: str(os.statvfs(mnt))))
            print("after handover, a new open:",
                  _outcome(lambda: open(os.path.join(mnt, "f"), "rb").read(10)))
            try:
                os.close(fd)
            except OSError:
                pass
        finally:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
            for name in os.listdir("/proc"):  # the successor, found by its command line
                if name.isdigit():
                    try:
                        cmd = open(f"/proc/{name}/cmdline", "rb").read()
                    except OSError:
                        continue
                    if b"bench.restart_probe\0new" in cmd:
                        os.kill(int(name), 9)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "probe"
    if mode == "old":
        _old(sys.argv[2], sys.argv[3])
    elif mode == "new":
        _new(int(sys.argv[2]))
    else:
        probe()
