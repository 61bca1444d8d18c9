"""`tieredfs demo` end to end: its own S3 server, a real mount, verified reads, and a
clean exit on Ctrl-C with nothing left mounted or listening."""

import os
import re
import signal
import socket
import subprocess
import urllib.parse
from pathlib import Path

from conftest import tieredfs_cmd


def test_demo_reads_verified_bytes_and_cleans_up_on_ctrl_c():
    # The demo sets its own dummy credentials: none are passed in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(tieredfs_cmd("demo", "--keep"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        out = "".join(lines)
        mnt = Path(re.search(r"on (\S+) in [\d.]+ s", out).group(1))
        port = urllib.parse.urlsplit(re.search(r"moto on (\S+)", out).group(1)).port
        assert os.path.ismount(mnt), out
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out += rest
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err
    assert out.count("every byte verified") == 2
    assert re.search(r"cold read +303 files, [\d.]+ MiB .* [1-9]\d* S3 GETs", out), out
    assert re.search(r"warm read +303 files, .* 0 S3 GETs", out), out
    assert "cleaned up" in out
    assert str(mnt) not in Path("/proc/mounts").read_text()
    assert not mnt.parent.exists()  # the temp dir with the cache is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the S3 server is stopped
