"""GPU power, utilisation and energy through NVML (``pynvml`` from nvidia-ml-py).

``EnergyMeter(device)`` samples power and utilisation in a background thread
while a block of work runs:

    meter = EnergyMeter("cuda")
    if meter.unavailable_reason is None:
        with meter.measure() as reading:
            ...  # timed steps
        reading.energy_j, reading.power_w, reading.util_pct

Energy comes from the GPU's cumulative energy counter
(``nvmlDeviceGetTotalEnergyConsumption``, Volta and newer) when it exists,
else from integrating the sampled power over time (trapezoid rule). Without
an NVIDIA GPU or without pynvml, ``unavailable_reason`` says why and nothing
else happens: energy is optional.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import torch


@dataclass
class PowerReading:
    """The result of one ``measure()`` block (filled in when the block ends)."""

    energy_j: Optional[float] = None
    power_w: Optional[float] = None      # mean sampled power
    util_pct: Optional[float] = None     # mean sampled GPU utilisation
    samples: int = 0
    method: str = ""
    times: List[float] = field(default_factory=list, repr=False)
    watts: List[float] = field(default_factory=list, repr=False)
    utils: List[float] = field(default_factory=list, repr=False)


def trapezoid_energy(times: List[float], watts: List[float]) -> float:
    """Joules under a piecewise-linear power curve sampled at ``times`` (seconds)."""
    return sum(0.5 * (watts[i] + watts[i + 1]) * (times[i + 1] - times[i]) for i in range(len(times) - 1))


class PowerSampler:
    """Calls ``read() -> (watts, util_pct)`` every ``interval_s`` seconds in a
    background thread between ``start()`` and ``stop()``; one sample is taken
    at each end so that even a short block has a power curve."""

    def __init__(self, read: Callable[[], Tuple[float, float]], interval_s: float = 0.02):
        if interval_s <= 0:
            raise ValueError(f"Invalid interval_s: {interval_s} (must be > 0)")
        self._read = read
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reading = PowerReading()

    def _sample(self) -> None:
        watts, util = self._read()
        self.reading.times.append(time.perf_counter())
        self.reading.watts.append(watts)
        self.reading.utils.append(util)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def start(self) -> None:
        self.reading = PowerReading()
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="fastsgd-power-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> PowerReading:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        r = self.reading
        r.samples = len(r.watts)
        r.power_w = sum(r.watts) / r.samples
        r.util_pct = sum(r.utils) / r.samples
        r.energy_j = trapezoid_energy(r.times, r.watts)
        r.method = f"integrated sampled power ({r.samples} samples)"
        return r


def nvml_unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None when NVML can measure ``device``, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"energy is read through NVML on NVIDIA GPUs; the device is {device.type}"
    if getattr(torch.version, "hip", None):
        return "energy is read through NVML on NVIDIA GPUs; this torch is a ROCm build"
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return "pynvml is not installed (pip install nvidia-ml-py)"
    return None


class EnergyMeter:
    """Power, utilisation and energy of the NVIDIA GPU behind a torch CUDA device."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.02):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.unavailable_reason = nvml_unavailable_reason(self.device)
        self._nvml = None
        self._handle = None
        if self.unavailable_reason is None:
            try:
                self._open()
            except Exception as exc:  # any NVML error means: no energy figures, with the reason
                self.unavailable_reason = f"NVML could not be used: {exc}"

    def _open(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:  # by UUID: robust to CUDA_VISIBLE_DEVICES renumbering
            uuid = torch.cuda.get_device_properties(index).uuid
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception as exc:  # torch without .uuid, or a UUID format NVML does not take
            if os.environ.get("CUDA_VISIBLE_DEVICES"):  # indices differ between torch and NVML: do not guess
                raise RuntimeError(f"cannot match cuda:{index} to an NVML device by UUID ({exc}) while "
                                   "CUDA_VISIBLE_DEVICES renumbers the GPUs") from None
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._read()  # fail here, not in the sampling thread

    def _read(self) -> Tuple[float, float]:
        watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        util = float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
        return watts, util

    def _energy_counter_mj(self) -> Optional[int]:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except Exception:  # not supported before Volta
            return None

    @contextmanager
    def measure(self) -> Iterator[PowerReading]:
        """Sample while the block runs; the yielded reading is filled in at its end."""
        if self.unavailable_reason is not None:
            raise RuntimeError(f"energy cannot be measured: {self.unavailable_reason}")
        sampler = PowerSampler(self._read, self.interval_s)
        counter_start = self._energy_counter_mj()
        sampler.start()
        reading = sampler.reading
        try:
            yield reading
        finally:
            sampler.stop()
            counter_end = self._energy_counter_mj()
            if counter_start is not None and counter_end is not None and counter_end > counter_start:
                reading.energy_j = (counter_end - counter_start) / 1000.0
                reading.method = "NVML total energy counter"

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
