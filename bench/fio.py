"""Runs the job files in bench/fio/ (the same ones a user runs by hand) and reads fio's JSON."""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cpu import CpuSampler

JOBS = Path(__file__).resolve().parent / "fio"


@dataclass
class FioResult:
    bytes: int
    seconds: float
    iops: float
    loops: int
    cpu: dict  # bench/cpu.py, from when fio's reads began to when they ended

    @property
    def mib_s(self) -> float:
        return self.bytes / (1 << 20) / self.seconds if self.seconds else 0.0


def available() -> bool:
    return shutil.which("fio") is not None


def run(job: str, loops: int = 1, **env: str | int) -> FioResult:
    """Run bench/fio/<job>.fio with its ${VARS} from env; one (group-reported) job.
    loops > 1 reads the file that many times (fio's runtime has 1 ms resolution)."""
    with CpuSampler() as cpu:
        proc = subprocess.run(
            ["fio", "--readonly", "--output-format=json", f"--loops={loops}", str(JOBS / f"{job}.fio")],
            env={**os.environ, **{k: str(v) for k, v in env.items()}},
            capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"fio {job} failed: {proc.stderr.strip() or proc.stdout[-500:]}")
    # fio may print notes ("opendir added N files") before the JSON document.
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    job_report = report["jobs"][0]
    read = job_report["read"]
    if job_report.get("error"):
        raise RuntimeError(f"fio {job}: error {job_report['error']}")
    end = report["timestamp_ms"] / 1000  # the report's time: a few ms after the last read
    return FioResult(bytes=read["io_bytes"], seconds=read["runtime"] / 1000, iops=read["iops"],
                     loops=loops, cpu=cpu.between(end - read["runtime"] / 1000, end))
