"""Search spaces, scrambled Sobol points and Golmant's learning-rate scaling rules.

A search space is a small dict (JSON-friendly). Each entry is either a fixed
number or a range ``{"low": a, "high": b, "scale": "log" | "linear"}``::

    {"lr": {"low": 1e-3, "high": 10.0, "scale": "log"},
     "one_minus_momentum": {"low": 1e-3, "high": 1.0, "scale": "log"},
     "weight_decay": 0.0}

Known names: ``lr``; ``one_minus_momentum`` (searched instead of momentum, as
Shallue et al. do, so that 0.9, 0.99, 0.999 are equally far apart); or a
fixed ``momentum``; ``weight_decay``; and Shallue et al.'s linear decay:
``decay_alpha`` (final lr as a fraction of the initial lr) with
``decay_fraction`` (the decay ends after this fraction of the step budget;
the lr then stays at alpha * lr). Without ``decay_alpha`` the lr is constant.

Points come from a scrambled Sobol sequence over the unit cube (scipy.stats.qmc),
mapped to each range on its scale; the same points (same seed) are used at
every batch size so that batch sizes are compared on equal search effort.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "nesterov")
KNOWN = ("lr", "one_minus_momentum", "momentum", "weight_decay", "decay_alpha", "decay_fraction")
SCALING_RULES = ("constant", "sqrt", "linear", "linear-warmup")
EDGE_TOLERANCE = 0.05  # fraction of a dimension's (scaled) width counted as "at the edge"

_LR = {"low": 1e-3, "high": 10.0, "scale": "log"}
_ONE_MINUS_MOMENTUM = {"low": 1e-3, "high": 1.0, "scale": "log"}


def default_space(optimizer: str) -> Dict[str, object]:
    """A space that works for the bundled workloads: lr in [1e-3, 10] (log) and,
    for momentum/Nesterov, 1 - momentum in [1e-3, 1] (log)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    space: Dict[str, object] = {"lr": dict(_LR)}
    if optimizer != "sgd":
        space["one_minus_momentum"] = dict(_ONE_MINUS_MOMENTUM)
    return space


def validate_space(space: Mapping[str, object], optimizer: str) -> Dict[str, object]:
    """Check a space; return it with ranges normalised. Raises ValueError naming the problem."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Invalid optimizer: {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    out: Dict[str, object] = {}
    for name, spec in space.items():
        if name not in KNOWN:
            raise ValueError(f"search space: unknown name {name!r}; known names are {', '.join(KNOWN)}")
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            out[name] = float(spec)
            continue
        if not isinstance(spec, Mapping) or "low" not in spec or "high" not in spec:
            raise ValueError(f"search space: {name!r} must be a number or {{'low', 'high', 'scale'}}, got {spec!r}")
        low, high, scale = float(spec["low"]), float(spec["high"]), spec.get("scale", "linear")
        if scale not in ("log", "linear"):
            raise ValueError(f"search space: {name!r} has scale {scale!r}; use 'log' or 'linear'")
        if not low < high:
            raise ValueError(f"search space: {name!r} needs low < high, got low={low}, high={high}")
        if scale == "log" and low <= 0:
            raise ValueError(f"search space: {name!r} is on a log scale, so low must be > 0, got {low}")
        out[name] = {"low": low, "high": high, "scale": scale}
    if "lr" not in out:
        raise ValueError("search space: 'lr' is required (a number or a range)")
    if "momentum" in out and "one_minus_momentum" in out:
        raise ValueError("search space: give 'momentum' or 'one_minus_momentum', not both")
    has_momentum = "momentum" in out or "one_minus_momentum" in out
    if optimizer == "sgd" and has_momentum:
        raise ValueError("search space: optimizer 'sgd' has no momentum; remove the momentum entry "
                         "or use 'momentum'/'nesterov'")
    if optimizer != "sgd" and not has_momentum:
        raise ValueError(f"search space: optimizer {optimizer!r} needs 'momentum' or 'one_minus_momentum'")
    if ("decay_alpha" in out) != ("decay_fraction" in out):
        raise ValueError("search space: linear decay needs both 'decay_alpha' and 'decay_fraction'")
    return out


def searched(space: Mapping[str, object]) -> List[str]:
    """Names with a range (the Sobol dimensions), in a fixed order."""
    return [n for n in KNOWN if isinstance(space.get(n), Mapping)]


def _from_unit(u: float, spec: Mapping[str, object]) -> float:
    low, high = float(spec["low"]), float(spec["high"])
    if spec["scale"] == "log":
        return float(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))
    return float(low + u * (high - low))


def _to_unit(x: float, spec: Mapping[str, object]) -> float:
    low, high = float(spec["low"]), float(spec["high"])
    if spec["scale"] == "log":
        return (math.log(x) - math.log(low)) / (math.log(high) - math.log(low))
    return (x - low) / (high - low)


def sobol_points(space: Mapping[str, object], n: int, seed: int = 0) -> List[Dict[str, float]]:
    """``n`` points of a scrambled Sobol sequence mapped onto ``space``: dicts of
    the searched names (as written in the space, e.g. one_minus_momentum)."""
    from scipy.stats import qmc

    if n < 1:
        raise ValueError(f"need at least one trial, got {n}")
    dims = searched(space)
    if not dims:
        return [{} for _ in range(n)]
    with warnings.catch_warnings():
        # n need not be a power of two; balance is slightly worse then, which is fine for a search.
        warnings.simplefilter("ignore", category=UserWarning)
        unit = qmc.Sobol(d=len(dims), scramble=True, seed=seed).random(n)
    return [{name: _from_unit(float(u[j]), space[name]) for j, name in enumerate(dims)} for u in unit]


def hparams(point: Mapping[str, float], space: Mapping[str, object]) -> Dict[str, float]:
    """The trial's hyperparameters from a point plus the fixed entries:
    lr, momentum (0 for plain SGD), weight_decay, and decay_alpha/decay_fraction if present."""
    merged = {k: v for k, v in space.items() if not isinstance(v, Mapping)}
    merged.update(point)
    out = {"lr": float(merged["lr"]), "momentum": 0.0, "weight_decay": float(merged.get("weight_decay", 0.0))}
    if "one_minus_momentum" in merged:
        out["momentum"] = 1.0 - float(merged["one_minus_momentum"])
    elif "momentum" in merged:
        out["momentum"] = float(merged["momentum"])
    if "decay_alpha" in merged:
        out["decay_alpha"] = float(merged["decay_alpha"])
        out["decay_fraction"] = float(merged["decay_fraction"])
    return out


def at_edge(hp: Mapping[str, float], space: Optional[Mapping[str, object]],
            tolerance: float = EDGE_TOLERANCE) -> List[str]:
    """Searched dimensions where ``hp`` lies within ``tolerance`` of the range's
    low or high end (on the range's scale), as "name:low" / "name:high"."""
    if not space:
        return []
    out = []
    for name in searched(space):
        if name == "one_minus_momentum":
            value = 1.0 - float(hp["momentum"])
        elif name in hp:
            value = float(hp[name])
        else:
            continue
        u = _to_unit(value, space[name])
        if u <= tolerance:
            out.append(f"{name}:low")
        elif u >= 1.0 - tolerance:
            out.append(f"{name}:high")
    return out


# ---------------------------------------------------------------- Golmant protocol

def scale_lr(lr: float, base_batch_size: int, batch_size: int, rule: str) -> float:
    """Golmant et al. 2018's heuristics for moving a tuned lr from ``base_batch_size``
    to ``batch_size``: constant, sqrt (lr * sqrt(k)) or linear (lr * k), k = B / B_base.
    ``linear-warmup`` scales like linear; the warm-up is added by :func:`scaled_hparams`."""
    if rule not in SCALING_RULES:
        raise ValueError(f"Invalid scaling rule: {rule!r}; choose one of {', '.join(SCALING_RULES)}")
    if base_batch_size <= 0 or batch_size <= 0:
        raise ValueError(f"batch sizes must be positive, got base {base_batch_size} and {batch_size}")
    k = batch_size / base_batch_size
    if rule == "constant":
        return lr
    if rule == "sqrt":
        return lr * math.sqrt(k)
    return lr * k


def scaled_hparams(best: Mapping[str, float], base_batch_size: int, batch_size: int, rule: str, *,
                   warmup_examples: int = 0) -> Dict[str, float]:
    """The base batch size's best hyperparameters moved to ``batch_size`` by ``rule``.

    For ``linear-warmup`` (Goyal et al. 2017) the lr ramps linearly from the
    base lr to the scaled lr over ``warmup_examples / batch_size`` steps (Goyal
    et al. use 5 epochs); the other rules ignore ``warmup_examples``."""
    out = dict(best)
    out["lr"] = scale_lr(float(best["lr"]), base_batch_size, batch_size, rule)
    if rule == "linear-warmup" and batch_size > base_batch_size:
        out["warmup_steps"] = float(max(1, math.ceil(warmup_examples / batch_size)))
        out["warmup_start_lr"] = float(best["lr"])
    return out


def trial_seeds(study_seed: int, batch_size: int, n: int) -> List[int]:
    """Independent 31-bit seeds for the ``n`` trials of one batch size."""
    ss = np.random.SeedSequence([int(study_seed), int(batch_size)])
    return [int(x) for x in ss.generate_state(n, dtype=np.uint32) >> 1]
