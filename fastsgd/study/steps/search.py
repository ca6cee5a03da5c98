"""Search spaces, scrambled Sobol points, the search protocol's rules and Golmant's lr scaling.

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
mapped to each range on its scale. Every batch size gets its own scrambling
(:func:`point_seed`, from the study seed and the batch size, so reproducible):
reusing one set of points everywhere would make every batch size share the same
holes in the space. Batch sizes are compared on equal search effort by counting
non-diverged trials instead (:func:`top_up`).

Protocol rules on finished trials (pure functions of TrialRecords, used by
fastsgd.study.steps.runner; the ``search`` and ``refine`` roles form a batch size's
search, reseeds are left out of every ranking):

- :func:`rank`: trials that reached the goal by steps to result (ties: lower
  trial id), then the other non-diverged trials by the best value they
  reached; diverged and unfinished trials are not ranked.
- :func:`kth_best_steps`: the k-th best steps to result, the pruning cap.
- :func:`top_up`: more Sobol points until ``target`` trials did not diverge,
  at most ``hard_cap`` in all.
- :func:`refine_space`: the box around the best ``k`` points, widened by
  REFINE_MARGIN, for a second search stage.
- :func:`next_budget`: a larger step budget when the winner used more than half
  of the budget (or nothing reached the goal), up to a cap.
- :func:`next_lr_diverged`: the winner's nearest neighbour with a larger
  effective lr (lr / (1 - momentum), the direction in which training diverges)
  diverged: the optimum may lie right at the stability edge.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from fastsgd.study.steps.analysis import (
    FINAL_OUTCOMES,
    INFEASIBLE,
    SEARCH_ROLES,
    TrialRecord,
    effective_lr,
    trial_steps_to_result,
)

OPTIMIZERS = ("sgd", "momentum", "nesterov")
KNOWN = ("lr", "one_minus_momentum", "momentum", "weight_decay", "decay_alpha", "decay_fraction")
SCALING_RULES = ("constant", "sqrt", "linear", "linear-warmup")
EDGE_TOLERANCE = 0.05  # fraction of a dimension's (scaled) width counted as "at the edge"
REFINE_MARGIN = 0.1    # the refine box extends this fraction of each (scaled) range beyond the best points

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


def sobol_points(space: Mapping[str, object], n: int, seed: int = 0, start: int = 0) -> List[Dict[str, float]]:
    """Points ``start`` .. ``start + n - 1`` of a scrambled Sobol sequence mapped onto
    ``space``: dicts of the searched names (as written in the space, e.g.
    one_minus_momentum). A later call with ``start`` = the points taken so far
    continues the same sequence (top-ups)."""
    from scipy.stats import qmc

    if n < 1:
        raise ValueError(f"need at least one trial, got {n}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    dims = searched(space)
    if not dims:
        return [{} for _ in range(n)]
    with warnings.catch_warnings():
        # n need not be a power of two; balance is slightly worse then, which is fine for a search.
        warnings.simplefilter("ignore", category=UserWarning)
        unit = qmc.Sobol(d=len(dims), scramble=True, seed=seed).random(start + n)[start:]
    return [{name: _from_unit(float(u[j]), space[name]) for j, name in enumerate(dims)} for u in unit]


STAGE_TAGS = {"search": 0, "refine": 1}


def point_seed(study_seed: int, batch_size: int, stage: str = "search") -> int:
    """The Sobol scrambling seed of one batch size and search stage: independent
    across batch sizes and stages, reproducible from the study seed."""
    ss = np.random.SeedSequence([int(study_seed), int(batch_size), 0x50B01, STAGE_TAGS[stage]])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


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


def point_of(hp: Mapping[str, float], space: Mapping[str, object]) -> Dict[str, float]:
    """The searched values of hyperparameters ``hp`` (inverse of :func:`hparams` on the
    searched names; names the hyperparameters lack are left out)."""
    out = {}
    for name in searched(space):
        if name == "one_minus_momentum":
            out[name] = 1.0 - float(hp["momentum"])
        elif name in hp:
            out[name] = float(hp[name])
    return out


def at_edge(hp: Mapping[str, float], space: Optional[Mapping[str, object]],
            tolerance: float = EDGE_TOLERANCE) -> List[str]:
    """Searched dimensions where ``hp`` lies within ``tolerance`` of the range's
    low or high end (on the range's scale), as "name:low" / "name:high"."""
    if not space:
        return []
    out = []
    for name, value in point_of(hp, space).items():
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


def trial_seeds(study_seed: int, batch_size: int, n: int, start: int = 0) -> List[int]:
    """Independent 31-bit seeds for trials ``start`` .. ``start + n - 1`` of one batch
    size (trial i always gets the same seed, however the trials are enqueued)."""
    ss = np.random.SeedSequence([int(study_seed), int(batch_size)])
    return [int(x) for x in ss.generate_state(start + n, dtype=np.uint32)[start:] >> 1]


# ---------------------------------------------------------------- protocol rules on finished trials

def _searching(records: Sequence[TrialRecord]) -> List[TrialRecord]:
    return [r for r in records if r.role in SEARCH_ROLES]


def _best_value(rec: TrialRecord, metric: str, higher_is_better: bool) -> float:
    vals = [v for v in rec.curve(metric)[1] if math.isfinite(v)]
    if not vals:
        return math.inf
    return -max(vals) if higher_is_better else min(vals)


def rank(records: Sequence[TrialRecord], goal: Optional[float], metric: str,
         higher_is_better: bool = False) -> List[TrialRecord]:
    """The finished, non-diverged search/refine trials, best first (see the module
    docstring); ``goal`` None ranks by best value only."""
    reached, rest = [], []
    for r in _searching(records):
        if r.outcome not in FINAL_OUTCOMES or r.outcome == INFEASIBLE:
            continue
        s = trial_steps_to_result(r, goal, metric, higher_is_better) if goal is not None else None
        if s is None:
            rest.append((_best_value(r, metric, higher_is_better), r.trial_id, r))
        else:
            reached.append((s, r.trial_id, r))
    return [r for *_, r in sorted(reached, key=lambda x: x[:2])] + [r for *_, r in sorted(rest, key=lambda x: x[:2])]


def kth_best_steps(records: Sequence[TrialRecord], k: int, goal: float, metric: str,
                   higher_is_better: bool = False) -> Optional[int]:
    """The ``k``-th smallest steps to result among the search/refine trials (None
    while fewer than ``k`` reached the goal): a trial that cannot get below it
    cannot enter the top ``k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    steps = sorted(s for s in (trial_steps_to_result(r, goal, metric, higher_is_better)
                               for r in _searching(records)) if s is not None)
    return steps[k - 1] if len(steps) >= k else None


def top_up(records: Sequence[TrialRecord], target: int, hard_cap: int) -> int:
    """How many more search points to enqueue: enough to bring the finished
    ``search`` trials that did not diverge to ``target``, without the ``search``
    trials passing ``hard_cap`` in all. 0 when done (or capped)."""
    if not 1 <= target <= hard_cap:
        raise ValueError(f"need 1 <= target <= hard_cap, got {target} and {hard_cap}")
    search = [r for r in records if r.role == "search"]
    feasible = sum(r.outcome in FINAL_OUTCOMES and r.outcome != INFEASIBLE for r in search)
    return max(0, min(target - feasible, hard_cap - len(search)))


def refine_space(space: Mapping[str, object], best: Sequence[Mapping[str, float]],
                 margin: float = REFINE_MARGIN) -> Dict[str, object]:
    """The part of ``space`` around the points ``best`` (dicts of searched names):
    per searched dimension, from the smallest to the largest best value, widened
    by ``margin`` of the range's width on each side (on its scale) and clipped to
    the range. Fixed entries are kept."""
    if not best:
        raise ValueError("refine_space: no points to refine around")
    out: Dict[str, object] = dict(space)
    for name in searched(space):
        spec = space[name]
        u = [_to_unit(float(p[name]), spec) for p in best]
        lo, hi = min(u) - margin, max(u) + margin
        out[name] = {"low": _from_unit(lo, spec) if lo > 0 else float(spec["low"]),  # exact ends when clipped
                     "high": _from_unit(hi, spec) if hi < 1 else float(spec["high"]), "scale": spec["scale"]}
    return out


def next_budget(records: Sequence[TrialRecord], budget: int, goal: float, metric: str, *, growth: float,
                cap: int, higher_is_better: bool = False) -> Optional[int]:
    """The larger budget to rerun the top trials with, or None: extend (by
    ``growth``, at most to ``cap``) when the best search/refine trial needed more
    than half of ``budget`` steps or none reached the goal, and some trial did
    not diverge (there is something to rerun)."""
    ranked = rank(records, goal, metric, higher_is_better)
    if not ranked or budget >= cap:
        return None
    best = trial_steps_to_result(ranked[0], goal, metric, higher_is_better)
    if best is not None and 2 * best <= budget:
        return None
    return int(min(cap, math.ceil(budget * growth)))


def next_lr_diverged(records: Sequence[TrialRecord], winner: TrialRecord) -> Optional[TrialRecord]:
    """The search/refine trial with the next larger effective lr after ``winner``'s,
    if it diverged (else None)."""
    mine = effective_lr(winner.hparams)
    larger = [r for r in _searching(records) if r.outcome in FINAL_OUTCOMES and effective_lr(r.hparams) > mine]
    if not larger:
        return None
    nxt = min(larger, key=lambda r: (effective_lr(r.hparams), r.trial_id))
    return nxt if nxt.outcome == INFEASIBLE else None
