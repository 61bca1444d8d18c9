"""Running as a service: the systemd unit, sd_notify readiness, signals and fstab's mount helper
(docs/systemd.md). Mounts left by a killed daemon: tests/test_startup.py.
"""

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import read_file, tieredfs_cmd
from test_startup import in_mount_table, pids_using
from tieredfs.devserver import wait_until
from tieredfs.fstab import translate

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "tieredfs@.service"
VENV_BIN = Path(sys.executable).parent


# --- the unit file ----------------------------------------------------------------------------


def _verify(unit_text: str, root: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on a throw-away root holding the system's units, the unit as
    tieredfs@data.service, and the commands it runs (tieredfs is looked for in /usr/local/bin)."""
    (root / "usr/lib/systemd").mkdir(parents=True, exist_ok=True)
    if not (root / "usr/lib/systemd/system").exists():
        shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for tool, src in (("usr/local/bin/tieredfs", VENV_BIN / "tieredfs"), ("usr/bin/kill", "/usr/bin/kill")):
        (root / tool).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / tool)
    unit = root / "etc/systemd/system/tieredfs@data.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", f"--root={root}", str(unit)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    text = UNIT.read_text()
    done = _verify(text, tmp_path / "root")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    # The check is real: a misspelt setting in the same unit fails it.
    broken = _verify(text.replace("Restart=on-failure", "Restart=on-falure"), tmp_path / "root")
    assert broken.returncode != 0 or "on-falure" in broken.stderr, broken.stderr
    assert "ExecStart=tieredfs mount --config /etc/tieredfs/%i.toml --foreground" in text
    assert "Type=notify" in text and "DeviceAllow=/dev/fuse rw" in text


# --- sd_notify, SIGHUP, SIGTERM ------------------------------------------------------------------


class NotifySocket:
    """A stand-in for systemd's end of NOTIFY_SOCKET: collects the daemon's datagrams."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict] = []

    def next(self, timeout: float = 60) -> dict:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.splitlines())
        self.messages.append(msg)
        return msg

    def until(self, key: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.next(max(0.1, deadline - time.monotonic()))
            if key in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


def write_config(path: Path, **values) -> Path:
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
    return path


@pytest.fixture
def service(tmp_path, s3server, bucket):
    """A daemon started the way the unit starts it: only a config file and NOTIFY_SOCKET."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    conf = tmp_path / "data.toml"
    values = {"url": f"s3://{bucket}", "mountpoint": mnt, "endpoint-url": s3server.url,
              "cache-dir": tmp_path / "cache", "log-level": "warning"}
    notify = NotifySocket(tmp_path / "notify.sock")
    log = open(tmp_path / "daemon.log", "wb")
    procs = []

    def start() -> subprocess.Popen:
        write_config(conf, **values)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
        procs.append(subprocess.Popen(tieredfs_cmd("mount", "--config", str(conf), "--foreground"),
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
        return procs[-1]

    yield start, notify, mnt, conf, values, tmp_path / "daemon.log"
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    notify.close()
    log.close()


def test_ready_only_once_the_mount_answers_then_sighup_reloads_and_sigterm_unmounts(service, put):
    start, notify, mnt, conf, values, log = service
    put("a.txt", b"alpha")
    proc = start()
    ready = notify.until("READY")
    # READY=1 is sent only after a stat through the mount came back: the mount answers now.
    assert os.stat(mnt).st_dev != os.stat(mnt.parent).st_dev
    assert ready["READY"] == "1" and int(ready["MAINPID"]) == proc.pid
    assert read_file(mnt / "a.txt") == b"alpha"
    assert any(m.get("STATUS", "").startswith("checking s3://") for m in notify.messages[:-1])
    assert f"on {mnt}" in ready["STATUS"]
    assert "level=INFO" not in log.read_text()  # log-level = "warning"

    # SIGHUP: log-level is applied live; cache-size cannot be, and the log says so.
    write_config(conf, **values | {"log-level": "debug", "cache-size": "1G"})
    proc.send_signal(signal.SIGHUP)
    assert notify.until("RELOADING")["RELOADING"] == "1"
    assert notify.until("READY")["READY"] == "1"
    text = log.read_text()
    assert "event=reloaded changed=log-level ignored=cache-size" in text, text
    assert "event=reload_ignored settings=cache-size reason=needs_restart" in text
    assert proc.poll() is None and read_file(mnt / "a.txt") == b"alpha"

    # A broken file on SIGHUP keeps the old settings and the mount.
    conf.write_text("log-level = [")
    proc.send_signal(signal.SIGHUP)
    assert "reload failed" in notify.until("READY")["STATUS"]
    assert proc.poll() is None and read_file(mnt / "a.txt") == b"alpha"

    proc.send_signal(signal.SIGTERM)
    assert notify.until("STOPPING")["STOPPING"] == "1"
    assert proc.wait(30) == 0
    assert not in_mount_table(mnt)
    assert "Traceback" not in log.read_text()


def test_sigterm_during_a_read_loop_unmounts_and_the_reader_never_hangs(bucket, put, mount_factory):
    data = put("big.bin", os.urandom(3 << 20))
    m = mount_factory(bucket)
    outcome: dict = {"reads": 0, "partial": 0}
    started = threading.Event()

    def reader():
        fd = os.open(m.path / "big.bin", os.O_RDONLY)
        try:
            while True:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # every pass reaches the daemon
                got = os.pread(fd, len(data), 0)
                if got != data[:len(got)]:
                    outcome["wrong"] = len(got)
                    return
                # A read cut by the unmount returns the bytes it had (the right ones) first.
                outcome["reads" if len(got) == len(data) else "partial"] += 1
                started.set()
        except OSError as e:
            outcome["errno"] = e.errno
        finally:
            started.set()
            try:
                os.close(fd)
            except OSError:
                pass  # the connection is gone: the kernel answers FLUSH with ENOTCONN

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert started.wait(60)
    os.kill(m.pid, signal.SIGTERM)
    t.join(60)
    assert not t.is_alive(), "a reader hung across SIGTERM"
    assert "wrong" not in outcome and outcome["reads"] > 0, outcome
    # After the unmount the open file's connection is gone: the kernel answers ENOTCONN,
    # or ECONNABORTED / EIO for a request that was in flight when it was cut.
    assert outcome.get("errno") in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED), outcome
    print("reader:", outcome)
    assert m.proc.wait(30) == 0
    assert not in_mount_table(m.path)
    assert "event=signal signal=SIGTERM action=unmount" in m.log.read_text()


# --- fstab and mount(8) -------------------------------------------------------------------------


def test_fstab_options_map_to_the_command_line():
    cmd, fake = translate(["s3://b/p", "/mnt/x", "-o",
                           "rw,_netdev,nofail,x-systemd.automount,endpoint_url=http://h:1,"
                           "cache-dir=/c,allow_other,dev,suid,list_ttl=5"])
    assert not fake
    assert cmd == ["mount", "s3://b/p", "/mnt/x", "--endpoint-url", "http://h:1", "--cache-dir", "/c",
                   "--list-ttl", "5", "-o", "allow_other"]
    assert translate(["s3://b", "/m", "-f", "-o", "bogus", "-s"]) == (["mount", "s3://b", "/m"], True)


def test_an_unknown_fstab_option_is_one_line():
    done = subprocess.run(tieredfs_cmd("s3://b", "/nonexistent", "-o", "bogus=1"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "bogus" in done.stderr, done.stderr


# mount(8) runs its helpers with no PATH (/bin/sh then searches /usr/local/bin:/usr/bin:...) and
# looks for /sbin/mount.fuse.tieredfs: both are system paths. The test puts this venv there in a
# private mount namespace of its own (unshare -m), so nothing outside it changes.
_MOUNT_SCRIPT = """
set -e
case "$ROUTE" in
  mount.fuse3) mount --bind "$VENV_BIN" /usr/local/bin ;;
  helper) mkdir -p "$SBIN" && ln -s "$VENV_BIN/mount.tieredfs" "$SBIN/mount.fuse.tieredfs"
          for f in /usr/sbin/*; do [ -e "$SBIN/${f##*/}" ] || ln -s "$f" "$SBIN/"; done
          mount --bind "$SBIN" /usr/sbin ;;
esac
mount -T "$FSTAB" "$MNT"
grep " $MNT " /proc/mounts
cat "$MNT/f.txt"; echo
umount "$MNT"
grep -c " $MNT " /proc/mounts || true
"""


@pytest.mark.skipif(not Path("/sbin/mount.fuse3").exists() or shutil.which("unshare") is None,
                    reason="fuse3's mount.fuse3 or util-linux's unshare missing")
@pytest.mark.parametrize("route", ["mount.fuse3", "helper"])
def test_mount_and_umount_from_an_fstab_line(route, tmp_path, s3server, bucket, put):
    """The real mount(8) reads the line and runs fuse3's mount.fuse3, which runs `tieredfs`
    (route mount.fuse3), or runs /sbin/mount.fuse.tieredfs -> mount.tieredfs (route helper)."""
    put("d/f.txt", b"via fstab")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"s3://{bucket}/d {mnt} fuse.tieredfs _netdev,nofail,noauto,x-systemd.automount,"
                     f"endpoint_url={s3server.url},cache_dir={cache},allow_other 0 0\n")
    env = dict(os.environ, ROUTE=route, VENV_BIN=str(VENV_BIN), SBIN=str(tmp_path / "sbin"),
               FSTAB=str(fstab), MNT=str(mnt))
    try:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               _MOUNT_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        table_line, content, left = done.stdout.splitlines()
        assert table_line.split()[2] == "fuse.tieredfs" and "allow_other" in table_line, table_line
        assert content == "via fstab" and left == "0"
        assert wait_until(lambda: not pids_using(str(cache)), 20), "the daemon outlived umount"
    finally:
        for pid in pids_using(str(cache)):  # its mount namespace, and the mount, go with it
            os.kill(pid, signal.SIGKILL)


def test_notify_reaches_an_abstract_socket_and_is_silent_without_one():
    from tieredfs.sdnotify import Notifier

    name = f"tieredfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        Notifier("@" + name).status("hello")
        assert sock.recv(4096) == b"STATUS=hello"
    Notifier(None).status("nobody listens")  # not under systemd: nothing sent, nothing raised
    Notifier("/nonexistent/notify.sock").status("gone")  # systemd gone: logged, not raised
