"""Per-step training time against batch size: the hardware half of time-to-result.

``measure_step_times(workload, batch_sizes, ...)`` trains ``workload``'s model
on one fixed synthetic batch per batch size (the data does not change the
time of a step, and drawing it is kept out of the timing). For each batch size
in increasing order: ``warmup`` untimed steps, then timed steps, at least
``steps`` of them and more until ``time_budget_s`` seconds are spent (at most
``max_steps``). One step is ``zero_grad(set_to_none=True)``, forward, loss,
backward -- device sync -- ``optimizer.step()`` -- device sync; the two parts
are timed separately within the same step, so step time = forward+backward
time + optimizer time for every step (the sync in the middle costs a few
microseconds on a GPU and nothing on a CPU).

Memory and stopping early:
- GPU: peak memory is ``torch.cuda.max_memory_allocated`` (tensors only),
  reset per batch size; ``torch.cuda.OutOfMemoryError`` ends the sweep cleanly.
- CPU: peak memory is the process's peak resident set size (VmHWM), reset per
  batch size through ``/proc/self/clear_refs`` (Linux; elsewhere the lifetime
  peak ``ru_maxrss``, which cannot be reset). It counts the whole process
  (Python, torch, the model), not only the step's tensors. No tracemalloc: it
  does not see torch's allocations.
- Before each batch size its peak is estimated from the batch sizes already
  measured (linear in B through the last two, or proportional growth over the
  starting memory after the first) and the sweep stops if the estimate passes
  the memory limit, so the machine never swaps. The CPU default limit is the
  process's memory at the start plus 80 % of the memory the system reports
  available; ``memory_limit_gb`` sets it. A step that still runs out of memory
  (``torch.cuda.OutOfMemoryError``, or a CPU allocator failure) also ends the sweep.
``StepTimeSweep.stopped`` says why and where it stopped, ``largest_fit`` is
the largest batch size that ran.

Results file (``write_results``): ``throughput.json`` is
``{"meta": {...}, "rows": [...]}`` (the layout of ``fastsgd.measure.write_rows``)
with schema ``fastsgd.throughput/1``:

meta:
  schema        "fastsgd.throughput/1"
  workload      {"name", "parameters" (count), "info" (the Workload's info dict)}
  settings      {"optimizer" (spec), "implementation" (what ran the step, e.g. "fastsgd backend cpu"),
                 "device", "warmup", "steps", "time_budget_s", "max_steps", "lr", "weight_decay",
                 "ghost_bn" (ghost batch size or null), "batch_sizes" (requested), "memory_limit_bytes"
                 (null: none), "memory_method", "energy_method" (or "n/a (reason)"), "seed", "threads"}
  environment   fastsgd.measure.environment(device): device name, torch/triton/fastsgd/python versions, date, commit
  fit           fastsgd.study.hardware.fit.HardwareFit.as_dict(): t0_s, throughput (X, examples/s),
                knee_batch_size (t0*X), r2, rel_residuals, max_abs_rel_residual, n_points, method, message, ok
  stopped       null (every batch size ran) or {"batch_size", "reason", "estimated_peak_bytes"
                (null unless stopped by the estimate)}
  largest_fit   the largest batch size that ran (null: none)
rows (one per batch size that ran, keys RECORD_KEYS, times in seconds):
  batch_size, warmup_steps, steps (timed)
  step_time_s, step_time_q20_s, step_time_q80_s      median and 20/80 % quantiles of whole steps
  fwd_bwd_time_s, optimizer_time_s                   medians of the two parts
  examples_per_s                                     batch_size / step_time_s
  examples_seen                                      examples trained on so far in the sweep, warm-up included
  peak_memory_bytes                                  see memory_method
  power_w, gpu_util_pct, energy_per_step_j, energy_per_example_j   null where energy_note is not "ok"
  energy_note                                        "ok (method)" or "n/a (reason)"
``throughput.csv`` holds the same rows, with a few meta fields repeated as columns.
"""
from __future__ import annotations

import gc
import os
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from fastsgd.measure import environment, quantiles, synchronize, write_rows
from fastsgd.study.hardware.energy import EnergyMeter
from fastsgd.study.hardware.fit import HardwareFit, fit_step_time
from fastsgd.study.optimizers import implementation, make_optimizer
from fastsgd.study.workloads.base import Workload

SCHEMA = "fastsgd.throughput/1"

RECORD_KEYS = (
    "batch_size", "warmup_steps", "steps",
    "step_time_s", "step_time_q20_s", "step_time_q80_s", "fwd_bwd_time_s", "optimizer_time_s",
    "examples_per_s", "examples_seen", "peak_memory_bytes",
    "power_w", "gpu_util_pct", "energy_per_step_j", "energy_per_example_j", "energy_note",
)
META_KEYS = ("schema", "workload", "settings", "environment", "fit", "stopped", "largest_fit")

DEFAULT_AVAILABLE_FRACTION = 0.8  # CPU default limit: start memory + this share of MemAvailable

# progress(event, batch_size, timed_steps_done): event is "start", "step" or "done"
Progress = Callable[[str, int, int], None]


@dataclass
class StepTimeSweep:
    """What ``measure_step_times`` found; ``write_results`` stores it."""

    records: List[Dict[str, Any]]
    settings: Dict[str, Any]
    workload: Dict[str, Any]
    environment: Dict[str, Any]
    stopped: Optional[Dict[str, Any]]   # None: every batch size ran
    fit: HardwareFit

    @property
    def largest_fit(self) -> Optional[int]:
        return self.records[-1]["batch_size"] if self.records else None

    def meta(self) -> Dict[str, Any]:
        return {"schema": SCHEMA, "workload": self.workload, "settings": self.settings,
                "environment": self.environment, "fit": self.fit.as_dict(), "stopped": self.stopped,
                "largest_fit": self.largest_fit}


# ---- memory ---------------------------------------------------------------------------------------------------
class _CudaMemory:
    method = "torch.cuda.max_memory_allocated (tensor memory), reset per batch size"

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


class _ProcessMemory:
    """Resident set size of this process from /proc/self/status (Linux), with
    the peak reset through /proc/self/clear_refs; elsewhere ru_maxrss."""

    def __init__(self):
        self.resettable = self._write_clear_refs()
        if self.resettable:
            self.method = "process peak RSS (VmHWM), reset per batch size via /proc/self/clear_refs"
        else:
            self.method = "process lifetime peak RSS (ru_maxrss; cannot be reset here, so it never decreases)"

    @staticmethod
    def _write_clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            return True
        except OSError:
            return False

    @staticmethod
    def _status_kb(field_name: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def reset_peak(self) -> None:
        if self.resettable:
            self._write_clear_refs()

    def current(self) -> int:
        kb = self._status_kb("VmRSS")
        return kb * 1024 if kb is not None else self.peak()

    def peak(self) -> int:
        kb = self._status_kb("VmHWM") if self.resettable else None
        if kb is not None:
            return kb * 1024
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _estimate_peak(measured: List[tuple], start_bytes: int, batch_size: int) -> int:
    """Peak memory expected at ``batch_size`` from (batch_size, peak) pairs already measured."""
    if not measured:
        return start_bytes
    if len(measured) == 1:  # assume all growth over the start scales with B (an overestimate: safe)
        b, peak = measured[0]
        return int(start_bytes + max(peak - start_bytes, 0) * batch_size / b)
    (b1, p1), (b2, p2) = measured[-2:]
    slope = max((p2 - p1) / (b2 - b1), 0.0)
    return int(max(p2 + slope * (batch_size - b2), p2))


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):  # torch.cuda.* also exists in torch 2.4
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # torch's CPU allocator


# ---- the sweep ------------------------------------------------------------------------------------------------
def _check_arguments(batch_sizes: Sequence[int], warmup: int, steps: int, time_budget_s: float, max_steps: int,
                     memory_limit_gb: Optional[float], ghost_bn: Optional[int]) -> List[int]:
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError("batch_sizes is empty")
    for b in sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
            raise ValueError(f"Invalid batch size: {b!r} (must be a positive integer)")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"Invalid warmup: {warmup!r} (must be an integer >= 0)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (must be an integer >= 1)")
    if not time_budget_s >= 0:
        raise ValueError(f"Invalid time_budget_s: {time_budget_s!r} (must be >= 0)")
    if max_steps < steps:
        raise ValueError(f"Invalid max_steps: {max_steps} (must be >= steps = {steps})")
    if memory_limit_gb is not None and not memory_limit_gb > 0:
        raise ValueError(f"Invalid memory_limit_gb: {memory_limit_gb!r} (must be > 0)")
    if ghost_bn is not None and (isinstance(ghost_bn, bool) or not isinstance(ghost_bn, int) or ghost_bn < 1):
        raise ValueError(f"Invalid ghost_bn: {ghost_bn!r} (a ghost batch size, a positive integer)")
    return sorted(set(sizes))


def _check_device(device: Union[str, torch.device]) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device}: step timing supports cpu and cuda")
    return device


def apply_ghost_batch_norm(model: torch.nn.Module, ghost_batch_size: int) -> torch.nn.Module:
    """``fastsgd.nn.convert_ghost_batch_norm(model, ghost_batch_size)``, with a
    clear error if this fastsgd has no ghost batch norm or the model no batch norm."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError(f"ghost batch norm requested, but {type(model).__name__} has no batch norm layers")
    try:
        from fastsgd.nn import convert_ghost_batch_norm
    except ImportError as exc:
        raise ValueError(f"ghost batch norm needs fastsgd.nn.convert_ghost_batch_norm, which cannot be imported "
                         f"from this fastsgd ({exc})") from None
    return convert_ghost_batch_norm(model, ghost_batch_size)


def measure_step_times(workload: Workload, batch_sizes: Sequence[int], *,
                       optimizer: Union[str, Callable[[Any], torch.optim.Optimizer]] = "fastsgd-nesterov",
                       device: Union[str, torch.device] = "cpu", warmup: int = 2, steps: int = 5,
                       time_budget_s: float = 0.0, max_steps: int = 1000, memory_limit_gb: Optional[float] = None,
                       ghost_bn: Optional[int] = None, lr: float = 0.01, weight_decay: float = 5e-4,
                       seed: int = 0, energy: bool = True, progress: Optional[Progress] = None) -> StepTimeSweep:
    """Time full training steps of ``workload`` at each batch size (see the module docstring).

    optimizer:       a spec for ``fastsgd.study.optimizers.make_optimizer`` (built with ``lr``,
                     ``weight_decay``) or a callable ``params -> optimizer``
    warmup, steps:   untimed steps, then at least ``steps`` timed ones per batch size
    time_budget_s:   keep timing a batch size until this many seconds are spent (0: exactly ``steps``)
    memory_limit_gb: stop before a batch size whose estimated peak memory passes this (see memory_method)
    ghost_bn:        convert the model's batch norms to ghost batch norm with this ghost batch size
    energy:          sample GPU power through NVML (a no-op, with the reason noted, where it is unavailable)
    progress:        called as progress(event, batch_size, timed_steps_done), event "start"/"step"/"done"
    Returns a StepTimeSweep with one record per batch size that ran and the t(B) fit.
    """
    sizes = _check_arguments(batch_sizes, warmup, steps, time_budget_s, max_steps, memory_limit_gb, ghost_bn)
    device = _check_device(device)

    torch.manual_seed(seed)
    model = workload.make_model()
    if ghost_bn is not None:
        model = apply_ghost_batch_norm(model, ghost_bn)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, str):
        opt = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay)
    else:
        opt = optimizer(params)
    try:  # a backend that cannot run here fails now, before any timing
        impl = implementation(opt)
    except TypeError as exc:  # the backend exists but not for this device/dtype: a bad request
        raise ValueError(str(exc)) from None
    generator = torch.Generator(device="cpu").manual_seed(seed)

    memory = _CudaMemory(device) if device.type == "cuda" else _ProcessMemory()
    gc.collect()
    start_bytes = memory.current()
    if memory_limit_gb is not None:
        limit = int(memory_limit_gb * 1e9)
    elif device.type == "cpu" and _available_bytes() is not None:
        limit = int(start_bytes + DEFAULT_AVAILABLE_FRACTION * _available_bytes())
    else:
        limit = None  # GPU without a limit: the device's capacity, through OutOfMemoryError

    meter = EnergyMeter(device) if energy else None
    energy_off = ("energy measurement switched off" if meter is None else meter.unavailable_reason)

    settings = {
        "optimizer": optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", repr(optimizer)),
        "implementation": impl, "device": str(device), "warmup": warmup, "steps": steps,
        "time_budget_s": time_budget_s, "max_steps": max_steps, "lr": lr, "weight_decay": weight_decay,
        "ghost_bn": ghost_bn, "batch_sizes": sizes, "memory_limit_bytes": limit, "memory_method": memory.method,
        "energy_method": f"n/a ({energy_off})" if energy_off else "NVML power sampling / energy counter",
        "seed": seed, "threads": torch.get_num_threads(),
    }
    workload_meta = {"name": workload.name, "parameters": sum(p.numel() for p in params),
                     "info": dict(workload.info)}

    def train_step(x, y) -> tuple:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        workload.loss(model(x), y).backward()
        synchronize(device)
        t1 = time.perf_counter()
        opt.step()
        synchronize(device)
        return t1 - t0, time.perf_counter() - t1

    records: List[Dict[str, Any]] = []
    measured_peaks: List[tuple] = []
    examples_seen = 0
    stopped = None
    try:
        for b in sizes:
            estimate = _estimate_peak(measured_peaks, start_bytes, b)
            if limit is not None and estimate > limit:
                stopped = {"batch_size": b, "estimated_peak_bytes": estimate,
                           "reason": f"estimated peak memory {estimate / 1e9:.2f} GB at batch size {b} exceeds "
                                     f"the memory limit {limit / 1e9:.2f} GB"}
                break
            if progress:
                progress("start", b, 0)
            try:
                record = _measure_one(b, workload, generator, device, train_step, warmup, steps, time_budget_s,
                                      max_steps, memory, meter, energy_off, progress)
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                stopped = {"batch_size": b, "estimated_peak_bytes": None,
                           "reason": f"out of memory at batch size {b} ({type(exc).__name__})"}
                break  # leaving the except block drops the traceback, and with it the batch's tensors
            examples_seen += b * (warmup + record["steps"])
            record["examples_seen"] = examples_seen
            records.append(record)
            measured_peaks.append((b, record["peak_memory_bytes"]))
            if progress:
                progress("done", b, record["steps"])
            if limit is not None and record["peak_memory_bytes"] > limit:
                stopped = {"batch_size": b, "estimated_peak_bytes": None,
                           "reason": f"peak memory {record['peak_memory_bytes'] / 1e9:.2f} GB at batch size {b} "
                                     f"passed the memory limit {limit / 1e9:.2f} GB; larger batch sizes skipped"}
                break
    finally:
        if meter is not None:
            meter.close()
    if stopped is not None and stopped["estimated_peak_bytes"] is None:  # give the memory back after an OOM
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    fit = fit_step_time([r["batch_size"] for r in records], [r["step_time_s"] for r in records])
    return StepTimeSweep(records, settings, workload_meta, environment(device), stopped, fit)


def _measure_one(b: int, workload: Workload, generator: torch.Generator, device: torch.device, train_step,
                 warmup: int, steps: int, time_budget_s: float, max_steps: int, memory, meter: Optional[EnergyMeter],
                 energy_off: Optional[str], progress: Optional[Progress]) -> Dict[str, Any]:
    x, y = workload.sample_batch(b, generator, device)
    gc.collect()
    memory.reset_peak()
    for _ in range(warmup):
        train_step(x, y)
    fwd_bwd: List[float] = []
    optim: List[float] = []

    def timed_steps() -> None:
        start = time.perf_counter()
        while len(fwd_bwd) < steps or (time.perf_counter() - start < time_budget_s and len(fwd_bwd) < max_steps):
            a, o = train_step(x, y)
            fwd_bwd.append(a)
            optim.append(o)
            if progress:
                progress("step", b, len(fwd_bwd))

    record: Dict[str, Any] = {"power_w": None, "gpu_util_pct": None, "energy_per_step_j": None,
                              "energy_per_example_j": None, "energy_note": f"n/a ({energy_off})"}
    if energy_off is None:
        with meter.measure() as reading:
            timed_steps()
        n = len(fwd_bwd)
        record.update(power_w=reading.power_w, gpu_util_pct=reading.util_pct, energy_per_step_j=reading.energy_j / n,
                      energy_per_example_j=reading.energy_j / (n * b), energy_note=f"ok ({reading.method})")
    else:
        timed_steps()
    total = quantiles([a + o for a, o in zip(fwd_bwd, optim)])
    record.update(batch_size=b, warmup_steps=warmup, steps=len(fwd_bwd), step_time_s=total["median"],
                  step_time_q20_s=total["q20"], step_time_q80_s=total["q80"],
                  fwd_bwd_time_s=quantiles(fwd_bwd)["median"], optimizer_time_s=quantiles(optim)["median"],
                  examples_per_s=b / total["median"], examples_seen=None, peak_memory_bytes=memory.peak())
    return {k: record[k] for k in RECORD_KEYS}


# ---- results files ----------------------------------------------------------------------------------------------
def write_results(sweep: StepTimeSweep, out_dir: str) -> Dict[str, str]:
    """Write ``throughput.json`` and ``throughput.csv`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    env = sweep.environment
    flat = {"workload": sweep.workload["name"], "optimizer": sweep.settings["optimizer"],
            "implementation": sweep.settings["implementation"], "device": sweep.settings["device"],
            "device_name": env.get("device"), "torch": env.get("torch"), "fastsgd": env.get("fastsgd"),
            "date": env.get("date")}
    return {"json": write_rows(os.path.join(out_dir, "throughput.json"), sweep.records, sweep.meta()),
            "csv": write_rows(os.path.join(out_dir, "throughput.csv"), sweep.records, flat)}
