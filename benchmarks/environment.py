"""The machine a benchmark ran on: CPU, GPU, versions, commit, and the measured copy bandwidth
the report compares the LoRA branch's traffic with."""

from __future__ import annotations

import datetime
import functools
import os
import platform
import statistics
import subprocess
import time

import torch

from benchmarks.cases import device_for, dtype_for
from benchmarks.measure import sync


@functools.cache
def copy_bandwidth(device_type: str) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a large clone; median of 10)."""
    device = torch.device(device_type)
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / statistics.median(times[2:])


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@functools.cache
def environment(size: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    device = device_for(size).type
    return dict(
        date=datetime.date.today().isoformat(),
        size=size,
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        gpu=torch.cuda.get_device_name() if cuda else None,
        torch=torch.__version__,
        triton=triton_version,
        git_commit=git_commit(),
        copy_bandwidth_bytes_per_s=copy_bandwidth(device),
        dtype=str(dtype_for(size)).replace("torch.", ""),
    )
