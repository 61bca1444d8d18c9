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
_FILES = {"f": 1 << 20, "big": 256 << 20}


def _fuse_fd() -> int:
    """pyfuse3 does not expose the session's descriptor: find the open /dev/fuse."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:
            pass
    raise RuntimeError("no /dev/fuse descriptor")


def _old(mountpoint: str, handover: str, relay: str) -> None:
    pyfuse3.init(NullFS(_FILES, keep_cache=False), mountpoint, _OPTIONS)

    async def serve_until_handover():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            while not os.path.exists(handover):
                await trio.sleep(0.05)
            fd = _fuse_fd()
            os.set_inheritable(fd, True)
            subprocess.Popen([sys.executable, "-m", "bench.restart_probe", "new", str(fd), relay],
                             pass_fds=(fd,))
            time.sleep(1.0)  # the successor holds the descriptor before we let go of ours
            os._exit(0)  # no unmount, no fuse_session_destroy: as a crash or an exec would

    trio.run(serve_until_handover)


# The relay (docs/restart.md, way 2): libfuse gets one end of a socketpair; a synthetic INIT
# goes in first and its answer is dropped; then requests and replies are copied both ways.
_FAKE_UNIQUE = (1 << 63) | 1  # the kernel's request ids are even
_FUSE_INIT = 26
_INIT_FLAGS = (1 << 0) | (1 << 5) | (1 << 13) | (1 << 14) | (1 << 15) | (1 << 18)  # ASYNC_READ,
# BIG_WRITES, DO_READDIRPLUS, READDIRPLUS_AUTO, ASYNC_DIO, PARALLEL_DIROPS; no splice: a socket
_BUF = 4 << 20


def _relay(fuse_fd: int) -> int:
    import socket
    import struct
    import threading

    ours, libfuse_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    init_in = struct.pack("<IIIII44x", 7, 31, 1 << 20, _INIT_FLAGS, 0)
    header = struct.pack("<IIQQIIIHH", 40 + len(init_in), _FUSE_INIT, _FAKE_UNIQUE, 0, 0, 0, 0, 0, 0)
    ours.send(header + init_in)

    def kernel_to_libfuse():
        while True:
            try:
                request = os.read(fuse_fd, _BUF)
            except OSError:  # ENODEV: unmounted
                ours.close()
                return
            ours.send(request)

    def libfuse_to_kernel():
        while True:
            reply = ours.recv(_BUF)
            if not reply:
                return
            if struct.unpack_from("<Q", reply, 8)[0] != _FAKE_UNIQUE:
                os.write(fuse_fd, reply)

    for fn in (kernel_to_libfuse, libfuse_to_kernel):
        threading.Thread(target=fn, daemon=True).start()
    return libfuse_end.detach()


def _new(fd: int, relay: bool) -> None:
    if relay:
        fd = _relay(fd)
    pyfuse3.init(NullFS(_FILES, keep_cache=False), f"/dev/fd/{fd}", _OPTIONS)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def _outcome(fn) -> str:
    try:
        return f"ok ({len(fn())} bytes)"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _mib_per_s(path: str) -> str:
    """256 MiB read in 1 MiB calls (the file is not kept in the page cache: keep_cache=False)."""
    try:
        start, total = time.perf_counter(), 0
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
        return f"{total / (1 << 20) / (time.perf_counter() - start):.0f} MiB/s"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def probe(relay: str) -> None:
    print(f"successor {'behind a relay with a synthetic INIT' if relay == 'relay' else 'on libfuse alone'}:")
    with tempfile.TemporaryDirectory() as tmp:
        mnt, handover = os.path.join(tmp, "mnt"), os.path.join(tmp, "handover")
        os.mkdir(mnt)
        old = subprocess.Popen([sys.executable, "-m", "bench.restart_probe", "old", mnt, handover, relay])
        try:
            while not os.path.ismount(mnt):
                time.sleep(0.05)
            fd = os.open(os.path.join(mnt, "f"), os.O_RDONLY)
            print("before handover, read of the open file:", _outcome(lambda: os.pread(fd, 4096, 0)))
            print(f"before handover, sequential read: {_mib_per_s(os.path.join(mnt, 'big'))}")
            open(handover, "w").close()
            old.wait(30)
            time.sleep(1.0)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            print("after handover, read of the open file:", _outcome(lambda: os.pread(fd, 4096, 0)))
            print(f"after handover, sequential read: {_mib_per_s(os.path.join(mnt, 'big'))}")
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
        _old(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode == "new":
        _new(int(sys.argv[2]), sys.argv[3] == "relay")
    else:
        probe("plain")
        probe("relay")
