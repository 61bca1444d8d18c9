"""Start-up through the real CLI: every failure is one line, non-zero, no traceback,
nothing left mounted or running; the daemonizing mode returns 0 only once the mount
answers; `tieredfs umount` works on a live mount and on one whose daemon was killed.
"""

import errno
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import read_file, tieredfs_cmd
from tieredfs.devserver import DevS3Server, free_port, wait_until

MODES = {"foreground": ["--foreground"], "daemon": []}


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(tieredfs_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env=env)


def pids_using(marker: str) -> list[int]:
    """Processes whose command line names `marker` (our unique cache dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def in_mount_table(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text().splitlines())


class Attempt:
    """A mount point and cache dir of one `tieredfs mount` run; cleans up after itself."""

    def __init__(self, tmp_path: Path, n: int):
        self.mnt = tmp_path / f"attempt-mnt{n}"
        self.mnt.mkdir()
        self.cache = tmp_path / f"attempt-cache{n}"

    def mount(self, url: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return run_cli("mount", url, str(self.mnt), "--cache-dir", str(self.cache), *extra, env=env)

    def daemons(self) -> list[int]:
        return pids_using(str(self.cache))

    def cleanup(self) -> None:
        if in_mount_table(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True, timeout=30)
        for pid in self.daemons():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def attempt(tmp_path):
    made = []

    def make() -> Attempt:
        made.append(Attempt(tmp_path, len(made)))
        return made[-1]

    yield make
    for a in made:
        a.cleanup()


@pytest.fixture(scope="module")
def auth_server():
    with DevS3Server(require_auth=True) as server:
        yield server


def assert_one_line_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tieredfs: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_nothing_left(a: Attempt) -> None:
    assert not in_mount_table(a.mnt)
    assert wait_until(lambda: not a.daemons(), 10), "a daemon is still running"


@pytest.mark.parametrize("mode", MODES)
def test_remote_failures(mode, attempt, s3server, auth_server, bucket, tmp_path):
    cases = [
        ("s3://no-such-bucket-here", s3server.url, "does not exist"),
        (f"s3://{bucket}", f"http://127.0.0.1:{free_port()}", "cannot reach S3 endpoint"),
        (f"s3://{bucket}", auth_server.url, "refused"),
    ]
    for url, endpoint, needle in cases:
        a = attempt()
        proc = a.mount(url, "--endpoint-url", endpoint, *MODES[mode])
        assert_one_line_failure(proc, needle)
        assert_nothing_left(a)
    # No credentials anywhere (the instance-role lookup is off: only 127.0.0.1 is reachable).
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare |= {"AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}
    a = attempt()
    proc = a.mount(f"s3://{bucket}", "--endpoint-url", s3server.url, *MODES[mode], env=bare)
    assert_one_line_failure(proc, "no AWS credentials found")
    assert_nothing_left(a)


@pytest.mark.parametrize("mode", MODES)
def test_local_failures(mode, attempt, s3server, bucket, mount_factory, tmp_path):
    live = mount_factory(bucket)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    a = attempt()
    common = ["--endpoint-url", s3server.url, *MODES[mode]]
    url = f"s3://{bucket}"
    for mountpoint, needle in [(tmp_path / "missing", "does not exist"),
                               (not_a_dir, "is not a directory"),
                               (live.path, "already a mount point")]:
        proc = run_cli("mount", url, str(mountpoint), "--cache-dir", str(a.cache), *common)
        assert_one_line_failure(proc, needle)
    assert os.listdir(live.path) == []  # the live mount is untouched
    no_fuse_tools = {**os.environ, "PATH": str(tmp_path / "empty-bin")}
    assert_one_line_failure(a.mount(url, *common, env=no_fuse_tools), "fusermount3 not found")
    assert_nothing_left(a)


@pytest.mark.parametrize("args, needle", [
    (["http://bucket"], "expected s3://BUCKET"),
    (["s3://.."], "not a usable bucket name"),
    (["s3://bkt", "--block-size", "64M", "--request-size", "64M"],
     "raise --cache-write-queue to at least --block-size"),
    (["s3://bkt", "--small-file-threshold", "128M"], "lower --small-file-threshold"),
    (["s3://bkt", "--file-mode", "0999"], "octal mode"),
    (["s3://bkt", "--block-size", "3K"], "power of two"),
    (["s3://bkt", "--block-size", "lots"], "cannot read 'lots' as a size"),
    (["s3://bkt", "--cache-size", "150%"], "percentage"),
    (["s3://bkt", "--list-ttl", "0"], "list-ttl must be positive"),
    (["s3://bkt", "--list-ttl", "soon"], "not a valid float"),
    (["s3://bkt", "--uid", "-1"], "not a valid id"),
    (["s3://bkt", "--cache-open-files", "0"], "cache-open-files must be at least 1"),
    (["s3://bkt", "--endpoint-url", "127.0.0.1:9000"], "must look like http"),
    (["s3://bkt", "-o", "rw"], "not supported"),
    (["s3://bkt", "--no-such-option"], "No such option"),
    (["s3://bkt", "--config", "/nonexistent.toml"], "does not exist"),
])
def test_bad_input_is_one_line(args, needle, attempt):
    a = attempt()
    url, *options = args
    assert_one_line_failure(a.mount(url, *options, "--foreground"), needle)
    assert_nothing_left(a)


@pytest.mark.parametrize("toml, needle", [
    ('list-ttl = "soon"', "list-ttl = 'soon' must be a number"),
    ("fuse-options = 'ro'", "must be a list of strings"),
    ("bucket = 'other'", "unknown setting 'bucket'"),
    ("[[[", "config file"),
])
def test_bad_config_file_is_one_line(toml, needle, attempt, tmp_path):
    config = tmp_path / "tieredfs.toml"
    config.write_text(toml)
    a = attempt()
    assert_one_line_failure(a.mount("s3://bkt", "--config", str(config), "--foreground"), needle)
    assert_nothing_left(a)


@pytest.mark.parametrize("mode", MODES)
def test_unwritable_cache_dir_or_log_file(mode, attempt, s3server, bucket):
    a = attempt()
    common = [f"s3://{bucket}", "--endpoint-url", s3server.url, *MODES[mode]]
    assert_one_line_failure(a.mount(*common, "--cache-dir", "/proc/no-such-dir"), "/proc/no-such-dir")
    assert_one_line_failure(a.mount(*common, "--log-file", "/proc/no-such-dir/x.log"),
                            "cannot write the log file")
    assert_nothing_left(a)


def test_daemon_mode_is_ready_on_return_and_umounts(attempt, s3server, bucket, put):
    data = put("x/data.bin", os.urandom(200_000))
    a = attempt()
    proc = a.mount(f"s3://{bucket}", "--endpoint-url", s3server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    # No waiting: ready means the mount answers now.
    assert os.path.ismount(a.mnt)
    assert read_file(a.mnt / "x" / "data.bin") == data
    (daemon,) = a.daemons()
    assert "event=mounted" in (a.cache / "tieredfs.log").read_text()
    # The log in the cache dir is as private as the cache (issue 18), created so before logging.
    assert (os.stat(a.cache).st_mode & 0o777, os.stat(a.cache / "tieredfs.log").st_mode & 0o777) == (0o700, 0o600)

    done = run_cli("umount", str(a.mnt))
    assert done.returncode == 0, done.stderr
    assert not in_mount_table(a.mnt)
    assert wait_until(lambda: not a.daemons(), 15), "the daemon outlived its mount"
    assert_one_line_failure(run_cli("umount", str(a.mnt)), "cannot unmount")


def test_a_mount_whose_daemon_was_killed_is_detached_by_mount_and_umount(attempt, s3server, bucket, put):
    put("f.txt", b"hello")
    a = attempt()
    url = f"s3://{bucket}"
    assert a.mount(url, "--endpoint-url", s3server.url).returncode == 0
    (daemon,) = a.daemons()
    os.kill(daemon, signal.SIGKILL)
    assert wait_until(lambda: not a.daemons(), 10)
    with pytest.raises(OSError) as dead:
        os.listdir(a.mnt)  # the kernel mount outlived its daemon
    assert dead.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    # Mounting again detaches the dead mount first, and says so.
    again = a.mount(url, "--endpoint-url", s3server.url)
    assert again.returncode == 0 and "event=dead_mount_detached" in again.stderr, again.stderr
    assert read_file(a.mnt / "f.txt") == b"hello"
    (daemon,) = a.daemons()
    os.kill(daemon, signal.SIGKILL)
    assert wait_until(lambda: not a.daemons(), 10)
    # So does `tieredfs umount`; the same mount point and cache dir then work straight away.
    done = run_cli("umount", str(a.mnt))
    assert done.returncode == 0 and "detached the dead mount" in done.stderr, done.stderr
    assert not in_mount_table(a.mnt)
    assert a.mount(url, "--endpoint-url", s3server.url).returncode == 0
    assert read_file(a.mnt / "f.txt") == b"hello"
    assert run_cli("umount", str(a.mnt)).returncode == 0
