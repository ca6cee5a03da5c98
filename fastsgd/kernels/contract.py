"""The kernel contract: every op's signature, once, and what each backend can do.

Ops. Every optimizer backend (reference, cpu, triton, cuda) implements the
three functions below with exactly these parameters and defaults (a test
compares each backend's signatures with these); the optimizer classes never
know which one ran. The reference (float64) is the oracle every test
compares against. Shared rules (the optimizer classes check them before
calling):

- ``params``/``grads``/state lists are aligned, tensors on one device, each
  grad with its param's shape and dtype, state tensors with the param's shape.
- ``lr`` (and ``momentum``, lamb's ``clip_divisor``) is a float or a tensor
  holding one value (0-dim or 1-element, as torch.optim takes
  ``lr=torch.tensor([0.1])``). A tensor with several values is refused
  before anything is modified, with an error that names the argument and
  stacked trials, whatever the params' shapes: stacking is never inferred
  from a shape (fastsgd.kernels.tensors.trial_hparams / single_hparams are
  the shared reading of these arguments).
- Stacked trials, the one exception: ``sgd_step(..., stacked_trials=True)``
  (an explicit opt-in; lars_step and lamb_step have no such mode). ``lr`` and
  ``momentum`` may then be 1-D tensors of length T, every param has T as its
  first dimension (T independent models trained side by side, as the study
  harness does), and row i of every param, grad and buffer uses lr[i] and
  momentum[i]. Such hyperparameter tensors live on the CPU for the cpu backend
  and on the params' device for GPU backends. Only backends whose
  ``Capabilities.stacked_trials`` is True take the flag; the others refuse it
  with an error naming stacked trials, so callers pick a backend by that
  field.
- ``first_step[i]`` is True when ``bufs[i]`` is new: then b = g (or lr*g in
  the lr_in_momentum form) instead of b = mu*b + (1-tau)*g.
- ``grad_scale`` (0-dim tensor or None): gradients are divided by it.
  ``found_inf`` (0-dim tensor or None): when non-zero, nothing is modified.
- Gradients are never modified.
- ``stochastic_rounding`` (sgd/lars): backends with
  ``Capabilities.stochastic_rounding`` round bfloat16 momentum buffers
  stochastically (unbiased). The reference always rounds to nearest and
  ignores the flag: it is the expected value the stochastic result is tested
  against. Backends without it refuse the flag.

Ghost batch norm (``fastsgd.nn.functional``) has its own backends ("torch",
"triton") with ``forward``/``backward`` on (N, C, L) views; they register in
the same registry (fastsgd/backends.py) with a Capabilities record.

Adding an op: its signature here -> the reference -> each backend -> the
shared test cases (tests/kernel_cases.py) -> a benchmark row.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

# ---- op signatures (bodies are never run: backends implement them) ------------------------


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
             lr: Scalar, momentum: Scalar = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
             nesterov: bool = False, maximize: bool = False, lr_in_momentum: bool = False,
             first_step: Union[bool, Sequence[bool]] = False,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
             stochastic_rounding: bool = False, stacked_trials: bool = False) -> None:
    """torch.optim.SGD's update (plain, momentum, Nesterov; lr outside the
    buffer, or inside with ``lr_in_momentum``). ``stacked_trials=True``: every
    param's first dimension is the trial, and ``lr`` / ``momentum`` may be 1-D
    tensors with one value per trial (never inferred from their shape)."""
    raise NotImplementedError


def lars_step(params: Sequence[Tensor], grads: Sequence[Tensor], bufs: Optional[Sequence[Optional[Tensor]]], *,
              lr: Scalar, momentum: Scalar = 0.9, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, trust_coeff: float = 0.001, eps: float = 1e-8,
              trust_clip: bool = False, always_adapt: bool = False, lr_in_momentum: bool = False,
              first_step: Union[bool, Sequence[bool]] = False,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
              stochastic_rounding: bool = False) -> None:
    """timm's Lars rule: per-tensor trust ratio, then SGD momentum."""
    raise NotImplementedError


def lamb_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], steps: Sequence[Tensor], *,
              lr: Scalar, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
              weight_decay: float = 0.01, bias_correction: bool = True, trust_clip: bool = False,
              always_adapt: bool = False, clip_divisor: Optional[Scalar] = None,
              grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None) -> None:
    """LAMB as timm computes it; ``steps[i]`` (0-dim float tensor) is incremented."""
    raise NotImplementedError


OPS = {"sgd_step": sgd_step, "lars_step": lars_step, "lamb_step": lamb_step}


def signature_mismatch(op: str, fn) -> Optional[str]:
    """None when ``fn`` takes exactly the parameters (names, kinds, defaults)
    of the contract's ``op``, else what differs."""
    want = [(p.name, p.kind, p.default) for p in inspect.signature(OPS[op]).parameters.values()]
    got = [(p.name, p.kind, p.default) for p in inspect.signature(inspect.unwrap(fn)).parameters.values()]
    if want == got:
        return None
    missing = [w for w in want if w not in got]
    extra = [g for g in got if g not in want]
    return f"{op}: missing or different {missing}, unexpected {extra}"


# ---- capabilities -------------------------------------------------------------------------
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Capabilities:
    """What one backend can do; get_backend, its error messages and the test
    matrix (run and compare, or expect a clear error) all read it."""
    name: str
    devices: str                          # in words, for messages ("CPU tensors", ...)
    dtypes: Tuple[torch.dtype, ...]       # param dtypes
    strided: bool = False                 # takes views with gaps (else dense layouts only)
    stacked_trials: bool = False          # sgd_step(stacked_trials=True): 1-D lr/momentum, one value per trial
    stochastic_rounding: bool = False     # bfloat16 momentum buffers rounded stochastically
    device_scalars: bool = False          # lr/grad_scale/found_inf read on the device (capturable, no sync)

    def handles(self, dtypes: Sequence[torch.dtype], dense: bool) -> bool:
        return (dense or self.strided) and all(dt in self.dtypes for dt in dtypes)

    def dtype_names(self) -> str:
        return ", ".join(str(dt).replace("torch.", "") for dt in self.dtypes)
