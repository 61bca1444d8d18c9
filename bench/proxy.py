"""A TCP proxy that delays every request by a fixed time, to imitate S3's round trips.

Real S3 answers in ~10-50 ms, loopback in ~0: with --s3-latency-ms the daemon and the
raw boto3 reference both talk to the endpoint through this proxy. Bytes from the client
are forwarded `latency` after they arrive (in order, without serialising the waits), so
each HTTP request costs one extra `latency`; responses are not delayed.

Run: python -m bench.proxy --target 127.0.0.1:PORT --latency-ms 20   (prints "READY <port>")
"""

import argparse
import asyncio
import subprocess
import sys
import time


async def _pump(reader, writer, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def forward():
        while (item := await queue.get()) is not None:
            due, data = item
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(forward())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait(None)
    try:
        await sender
    except ConnectionError:
        pass


async def _serve(target_host: str, target_port: int, delay: float) -> None:
    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(target_host, target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, 0.0))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


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
        asyncio.run(_serve(host, int(port), args.latency_ms / 1000))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
