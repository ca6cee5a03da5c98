"""What if I had N devices? A planning model for data-parallel time to result.

This is a planning tool, not a promise. It extrapolates one device's measured step
time and a steps-to-result fit with a textbook communication model; real clusters
add stragglers, topology, contention, input pipelines and memory limits it knows
nothing about. Use it to see *where* more devices stop paying off, not to quote
seconds.

The model
---------
A global batch ``B`` is split evenly over ``N`` devices (``b = B / N`` examples each,
fractional b allowed as an average; ``b < 1`` is not allowed).

* Compute per step: the single-device fit ``t_comp(b) = t0 + b / X`` at the per-device
  batch (``N = 1`` gives exactly the measured/fitted single-device ``t(B)``).
* Gradient all-reduce (ring): ``t_comm(N) = 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x alpha``
  (bandwidth in bytes/s per device link, alpha the per-message latency). 0 for N = 1.
* Overlap: a fraction ``overlap`` of the communication can run hidden behind the
  backward pass, which takes ``backward_fraction`` of the compute time (default 2/3:
  backward costs about twice the forward). Hidden time = min(overlap x t_comm,
  backward_fraction x t_comp); ``t_step = t_comp + t_comm - hidden``. With overlap 1 and
  backward_fraction 1 this is ``max(t_comp, t_comm)``.
* Steps: ``S(B) = S_min + E_min / B`` from a steps-to-result study (or predicted from the
  noise scale). Time to result ``T = S(B) x t_step``.

Assumed, not modelled: identical devices and links, a flat ring (no hierarchy),
bandwidth that does not depend on message size beyond the alpha term, per-device
memory large enough for b, the optimizer step cost inside t0, and steps to result
that depend only on the global batch (tuned metaparameters at every B).

For each N, the global batch is either fixed (``global_batch``), grown with N
(``per_device_batch``), or chosen to minimise T over powers of two (default).

Range: S(B) is known between the smallest and largest batch size the study measured
(``steps_range``) and t(b) between the smallest and largest per-device batch the
throughput sweep measured (``hardware_range``). By default the sweep stays inside both:
candidates outside are skipped, and a fixed batch outside them is an error. With
``extrapolate=True`` they are used, and every such row carries ``extrapolated`` (the
reasons; an empty list means inside both ranges).
"Stops paying off": the smallest N (in the powers-of-two sweep) from which doubling the
devices cuts time to result by less than ``min_gain`` (default 10 %).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fastsgd.study.combine.time_to_result import StepsCurve, StepTimeCurve
from fastsgd.study.tables import format_table

__all__ = ["CommModel", "WhatIf", "step_time", "what_if", "load_comm_model", "whatif_table"]


@dataclass(frozen=True)
class CommModel:
    """Ring all-reduce of ``grad_bytes`` with ``bandwidth`` bytes/s, ``latency`` s per
    message and ``overlap`` (0..1) of it hideable behind ``backward_fraction`` of compute."""

    grad_bytes: float
    bandwidth: float = math.inf
    latency: float = 0.0
    overlap: float = 0.0
    backward_fraction: float = 2.0 / 3.0

    def __post_init__(self) -> None:
        if not (self.grad_bytes >= 0 and math.isfinite(self.grad_bytes)):
            raise ValueError(f"grad_bytes must be finite and >= 0, got {self.grad_bytes!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s (inf: free), got {self.bandwidth!r}")
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"latency must be finite and >= 0 s, got {self.latency!r}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"overlap must lie in [0, 1], got {self.overlap!r}")
        if not 0.0 <= self.backward_fraction <= 1.0:
            raise ValueError(f"backward_fraction must lie in [0, 1], got {self.backward_fraction!r}")

    def allreduce_time(self, n: int) -> float:
        """Ring all-reduce time for n devices (0 for n = 1)."""
        if n < 1:
            raise ValueError(f"number of devices must be >= 1, got {n!r}")
        if n == 1:
            return 0.0
        return 2.0 * (n - 1) / n * self.grad_bytes / self.bandwidth + 2.0 * (n - 1) * self.latency


def step_time(hardware: StepTimeCurve, comm: CommModel, global_batch: float, n: int) -> Dict[str, float]:
    """Per-step time of ``global_batch`` split over ``n`` devices: compute, communication,
    hidden communication and the total (seconds)."""
    if n < 1:
        raise ValueError(f"number of devices must be >= 1, got {n!r}")
    per_device = global_batch / n
    if per_device < 1:
        raise ValueError(f"global batch {global_batch} over {n} devices is {per_device:.3g} examples each (< 1)")
    t_comp = float(hardware.time(per_device))
    t_comm = comm.allreduce_time(n)
    hidden = min(comm.overlap * t_comm, comm.backward_fraction * t_comp)
    return {"per_device_batch": per_device, "compute_s": t_comp, "comm_s": t_comm, "hidden_s": hidden,
            "step_time_s": t_comp + t_comm - hidden}


@dataclass
class WhatIf:
    rows: List[Dict[str, Any]]
    stops_paying_off: Optional[int]      # smallest N from which doubling gains < min_gain
    fastest_n: int                       # N with the smallest time to result
    min_gain: float
    mode: str

    def as_dict(self) -> Dict[str, Any]:
        return {"rows": self.rows, "stops_paying_off": self.stops_paying_off, "fastest_n": self.fastest_n,
                "min_gain": self.min_gain, "mode": self.mode}


def _devices(max_devices: int) -> List[int]:
    if not isinstance(max_devices, int) or max_devices < 1:
        raise ValueError(f"max_devices must be a positive integer, got {max_devices!r}")
    ns, n = [], 1
    while n <= max_devices:
        ns.append(n)
        n *= 2
    return ns


def _outside(b: float, n: int, steps_range, hardware_range) -> List[str]:
    """Why (global batch b, n devices) lies outside the measured ranges; [] when inside."""
    why = []
    if steps_range is not None and not steps_range[0] <= b <= steps_range[1]:
        why.append(f"global batch {b:g} outside the steps-to-result measurements "
                   f"[{steps_range[0]:g}, {steps_range[1]:g}]")
    if hardware_range is not None and not hardware_range[0] <= b / n <= hardware_range[1]:
        why.append(f"per-device batch {b / n:g} outside the step-time measurements "
                   f"[{hardware_range[0]:g}, {hardware_range[1]:g}]")
    return why


def what_if(steps: StepsCurve, hardware: StepTimeCurve, comm: CommModel, *, max_devices: int = 4096,
            global_batch: Optional[float] = None, per_device_batch: Optional[float] = None,
            batch_candidates: Optional[Sequence[float]] = None, min_gain: float = 0.10,
            steps_range: Optional[Tuple[float, float]] = None, hardware_range: Optional[Tuple[float, float]] = None,
            extrapolate: bool = False) -> WhatIf:
    """Per-step time and time to result for N = 1, 2, 4, ..., max_devices.

    Exactly one way to choose the global batch per N: ``global_batch`` (fixed),
    ``per_device_batch`` (B = N x b), or neither (the best of ``batch_candidates``,
    default powers of two from 1 to 2^24, with at least one example per device).
    ``steps_range`` / ``hardware_range`` / ``extrapolate``: see the module docstring
    (a range of None is not checked).
    """
    if global_batch is not None and per_device_batch is not None:
        raise ValueError("give global_batch or per_device_batch, not both")
    if global_batch is not None and not extrapolate:
        why = _outside(global_batch, 1, steps_range, None)
        if why:
            raise ValueError(f"{why[0]}: pass extrapolate=True to model it anyway (rows are then marked)")
    if not 0 < min_gain < 1:
        raise ValueError(f"min_gain must lie in (0, 1), got {min_gain!r}")
    if global_batch is not None:
        mode = f"fixed global batch {global_batch:g}"
    elif per_device_batch is not None:
        mode = f"fixed per-device batch {per_device_batch:g}"
    else:
        mode = "best global batch per N"
        batch_candidates = list(batch_candidates or [2.0 ** k for k in range(25)])
    rows: List[Dict[str, Any]] = []
    for n in _devices(max_devices):
        if global_batch is not None:
            choices = [global_batch] if global_batch >= n else []
        elif per_device_batch is not None:
            choices = [per_device_batch * n]
        else:
            choices = [b for b in batch_candidates if b >= n]
        best = None
        for b in choices:
            why = _outside(b, n, steps_range, hardware_range)
            if why and not extrapolate:
                continue
            st = step_time(hardware, comm, b, n)
            s = float(steps.steps(b))
            cand = {"devices": n, "global_batch": b, "steps": s, **st, "time_to_result_s": s * st["step_time_s"],
                    "extrapolated": why}
            if best is None or cand["time_to_result_s"] < best["time_to_result_s"]:
                best = cand
        if best is None:   # no batch fits N devices (or the measured ranges): stop the sweep there
            break
        rows.append(best)
    if not rows:
        raise ValueError("no device count fits the requested batch (need at least one example per device"
                         + ("" if extrapolate else ", inside the measured batch ranges; extrapolate=True to go "
                            "beyond them") + ")")
    t1 = rows[0]["time_to_result_s"]
    for r in rows:
        r["speedup"] = t1 / r["time_to_result_s"]
        r["efficiency"] = r["speedup"] / r["devices"]
    stops = None
    for prev, nxt in zip(rows, rows[1:]):
        if prev["time_to_result_s"] / nxt["time_to_result_s"] < 1.0 + min_gain:
            stops = prev["devices"]
            break
    fastest = min(rows, key=lambda r: r["time_to_result_s"])["devices"]
    return WhatIf(rows, stops, fastest, min_gain, mode)


def load_comm_model(path: Optional[str], grad_bytes: float, *, bandwidth: Optional[float] = None,
                    latency: Optional[float] = None, overlap: Optional[float] = None) -> CommModel:
    """A :class:`CommModel` from explicit values, filling the missing ones from an all-reduce
    benchmark JSON when ``path`` is given. Explicit arguments win.

    ``bench/allreduce.py`` output (``meta.allreduce_latency_s``: one all-reduce of a 4-byte
    message; ``meta.allreduce_bandwidth_GBps``: "algorithm bandwidth" bytes/(time - latency)
    of the largest message; ``meta.world_size`` W; rows with ``provider`` and
    ``hidden_comm``) is converted to the ring model's per-link terms: a ring all-reduce at
    W devices takes ``2(W-1)`` latency steps and moves ``2(W-1)/W`` x bytes per link, so
    ``alpha = latency / (2(W-1))`` and ``link bandwidth = algbw x 2(W-1)/W``. The overlap is
    the median ``hidden_comm`` of the ``bdp+fused_step`` provider (else of all rows).
    Generic JSON with ``bandwidth_bytes_per_s`` / ``bandwidth_gbps``, ``latency_s``,
    ``overlap_fraction`` (anywhere in the file) is read as per-link values directly.
    Missing values: infinite bandwidth / zero latency / no overlap, i.e. a lower bound on
    communication cost.
    """
    found: Dict[str, Any] = {}
    if path:
        with open(path) as f:
            d = json.load(f)
        found = _from_allreduce_bench(d) or _search_keys(
            d, ("bandwidth_bytes_per_s", "bandwidth_gbps", "latency_s", "overlap_fraction"))
        if not found:
            raise ValueError(f"{path}: found none of allreduce_bandwidth_GBps / allreduce_latency_s / "
                             "bandwidth_bytes_per_s / latency_s / overlap_fraction; give bandwidth/latency/overlap")
    if bandwidth is None:
        if "bandwidth_bytes_per_s" in found:
            bandwidth = float(found["bandwidth_bytes_per_s"])
        elif "bandwidth_gbps" in found:
            bandwidth = float(found["bandwidth_gbps"]) * 1e9
        else:
            bandwidth = math.inf
    if latency is None:
        latency = float(found.get("latency_s", 0.0))
    if overlap is None:
        overlap = min(max(float(found.get("overlap_fraction", 0.0)), 0.0), 1.0)
    return CommModel(grad_bytes=grad_bytes, bandwidth=bandwidth, latency=latency, overlap=overlap)


def _from_allreduce_bench(d: Any) -> Dict[str, Any]:
    """Per-link ring parameters from ``bench/allreduce.py``'s JSON, or {} if it is not one."""
    meta = d.get("meta") if isinstance(d, dict) else None
    if not isinstance(meta, dict) or "allreduce_latency_s" not in meta:
        return {}
    w = int(meta.get("world_size") or 2)
    out: Dict[str, Any] = {"latency_s": float(meta["allreduce_latency_s"]) / (2 * (w - 1))}
    if meta.get("allreduce_bandwidth_GBps"):
        out["bandwidth_bytes_per_s"] = float(meta["allreduce_bandwidth_GBps"]) * 1e9 * 2 * (w - 1) / w
    rows = [r for r in d.get("rows", []) if isinstance(r, dict) and r.get("hidden_comm") is not None]
    fused = ([r["hidden_comm"] for r in rows if r.get("provider") == "bdp+fused_step"]
             or [r["hidden_comm"] for r in rows])
    if fused:
        out["overlap_fraction"] = float(np.median(fused))
    return out


def _search_keys(d: Any, keys: Sequence[str]) -> Dict[str, Any]:
    """First occurrence of each key anywhere in a nested JSON value (dicts before lists)."""
    out: Dict[str, Any] = {}
    stack = [d]
    while stack:
        cur = stack.pop(0)
        if isinstance(cur, dict):
            for k in keys:
                if k in cur and k not in out and isinstance(cur[k], (int, float)):
                    out[k] = cur[k]
            stack.extend(v for v in cur.values() if isinstance(v, (dict, list)))
        elif isinstance(cur, list):
            stack.extend(v for v in cur if isinstance(v, (dict, list)))
    return out


def whatif_table(result: WhatIf, markdown: bool = False) -> str:
    """The what-if rows as a text (or Markdown) table."""
    cols = ["devices", "global_batch", "per_device_batch", "steps", "compute_s", "comm_s", "step_time_s",
            "time_to_result_s", "speedup", "efficiency"]
    return format_table(result.rows, cols, markdown=markdown)
