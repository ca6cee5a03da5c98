"""Shared measuring helpers for benchmarks and the study harness: timing with
device synchronisation, the environment a result was measured in, measured
memory bandwidth, and result files.

Timing convention (as in Liger-Kernel's benchmarks): median with the 20 % and
80 % quantiles over repetitions after warm-up.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples: Sequence[float]) -> Dict[str, float]:
    """median, q20, q80 (seconds) of a list of timings."""
    xs = sorted(samples)
    if len(xs) == 1:
        return {"median": xs[0], "q20": xs[0], "q80": xs[0], "n": 1}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"median": statistics.median(xs), "q20": q[1], "q80": q[7], "n": len(xs)}


def time_fn(fn: Callable[[], Any], *, device: torch.device | str = "cpu", warmup: int = 3, reps: int = 20,
            min_time: float = 0.0) -> Dict[str, float]:
    """Time ``fn()`` ``reps`` times (more if ``min_time`` seconds are not yet
    spent) after ``warmup`` calls; each call is synchronised on ``device``.
    Returns median/q20/q80 in seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: List[float] = []
    start_all = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * max(reps, 1):
            break
    return quantiles(samples)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device | str = "cpu") -> Dict[str, Any]:
    """Where and with what a result was measured."""
    import fastsgd
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "triton": triton_version,
        "fastsgd": fastsgd.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
    }


def memory_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 * 2**20, reps: int = 30) -> float:
    """Measured memory bandwidth in GB/s (1e9 bytes/s): the better of a large
    tensor copy (read + write) and an in-place ``a += s * b`` (two reads, one
    write back in place), bytes read plus bytes written.

    An optimizer step reads and writes its tensors in place; a copy into
    another buffer also pays a hidden read of the destination (write-allocate)
    and understates what in-place kernels can reach on a CPU, so both patterns
    are measured and the kernels' achieved GB/s (counted the same way) are
    compared with the higher one. As in STREAM, the best repetition counts:
    bandwidth is a ceiling, and on a shared machine the median mostly
    measures the neighbours."""
    device = torch.device(device)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.ones_like(src)

    def best(fn) -> float:
        fn()
        synchronize(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times)

    copy = best(lambda: dst.copy_(src))
    axpy = best(lambda: dst.add_(src, alpha=1e-3))
    return max(2 * n * 4 / copy, 3 * n * 4 / axpy) / 1e9


def write_rows(path: str, rows: Iterable[Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> str:
    """Write result rows as JSON ({"meta": ..., "rows": [...]}) or CSV (meta
    fields repeated as columns), chosen by the file extension."""
    rows = list(rows)
    meta = meta or {}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".csv"):
        fields: List[str] = []
        for r in [meta] + rows:
            fields += [k for k in r if k not in fields]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
    else:
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2, default=str)
    return path


def strict_json(x: Any) -> Any:
    """``x`` with NaN/inf floats (nested in dicts, lists, tuples) replaced by
    None, so ``json.dump(..., allow_nan=False)`` writes standard JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x
