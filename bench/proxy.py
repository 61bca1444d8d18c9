"""A TCP proxy that delays every request by a fixed time, to imitate S3's round trips.

Real S3 answers in ~10-50 ms, loopback in ~0: with --s3-latency-ms the daemon and the
raw boto3 reference both talk to the endpoint through this proxy. Bytes from the client
are forwarded `latency` after they arrive (in order, without serialising the waits), so
each HTTP request costs one extra `latency`; responses are not delayed.

Responses are moved with splice(2) through a pipe, so the kernel copies them and this
process does not: the proxy should add latency, not load. An asyncio proxy that copied each
64 KiB took 0.93 s of CPU per GiB here, on a 2-core machine where a cold read through tieredfs
takes ~2.3 s of CPU per GiB itself.

Run: python -m bench.proxy --target 127.0.0.1:PORT --latency-ms 20   (prints "READY <port>")
"""

import argparse
import os
import queue
import socket
import subprocess
import sys
import threading
import time

_PIPE_SIZE = 1 << 20


def _delayed(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """src -> dst, each chunk sent `delay` after it arrived (a sender thread keeps the order
    and lets the waits overlap)."""
    chunks: queue.Queue = queue.Queue()

    def send() -> None:
        try:
            while (item := chunks.get()) is not None:
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _shut(dst)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        while data := src.recv(1 << 16):
            chunks.put((time.monotonic() + delay, data))
    except OSError:
        pass
    chunks.put(None)
    sender.join()


def _spliced(src: socket.socket, dst: socket.socket) -> None:
    """src -> dst as the bytes come, through a pipe, never copied into this process."""
    r, w = os.pipe()
    try:
        try:
            import fcntl
            fcntl.fcntl(w, 1031, _PIPE_SIZE)  # F_SETPIPE_SZ: fewer, larger splices
        except OSError:
            pass
        while n := os.splice(src.fileno(), w, _PIPE_SIZE):
            while n:
                n -= os.splice(r, dst.fileno(), n)
    except OSError:
        pass
    finally:
        os.close(r)
        os.close(w)
        _shut(dst)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _connection(client: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        server = socket.create_connection(target)
    except OSError:
        client.close()
        return
    with client, server:
        upstream = threading.Thread(target=_delayed, args=(client, server, delay), daemon=True)
        upstream.start()
        _spliced(server, client)
        upstream.join()


def _serve(target: tuple[str, int], delay: float) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"READY {listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_connection, args=(client, target, delay), daemon=True).start()


class LatencyProxy:
    """The proxy in a child process (so the bench's own threads do not delay it further)."""

    def __init__(self, target_url: str, latency_ms: float):
        self.target = target_url.split("//", 1)[-1].rstrip("/")
        self.latency_ms = latency_ms
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> "LatencyProxy":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.proxy", "--target", self.target,
             "--latency-ms", str(self.latency_ms)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError("the latency proxy did not start")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT")
    p.add_argument("--latency-ms", type=float, required=True)
    args = p.parse_args()
    host, _, port = args.target.rpartition(":")
    try:
        _serve((host, int(port)), args.latency_ms / 1000)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
