"""GhostBatchNorm1d/2d/3d: drop-ins for nn.BatchNorm1d/2d/3d that normalise
each ghost batch of ``ghost_batch_size`` samples with its own statistics in
training (semantics and formulas: :mod:`fastsgd.nn.functional`).

Parameters and buffers are exactly nn.BatchNorm's (weight, bias,
running_mean, running_var, num_batches_tracked), so state dicts load both
ways. The classes derive from ``_NormBase`` (nn.BatchNorm's own base, which
owns those tensors and the state-dict versioning) but deliberately not from
``_BatchNorm``: code that finds batch norms by ``isinstance(m, _BatchNorm)``,
such as ``nn.SyncBatchNorm.convert_sync_batchnorm``, would otherwise replace
them with something that has no ghost batches.

The attribute ``backend`` ("auto", default: Triton kernels for CUDA tensors,
vectorised torch ops otherwise; or "torch" / "triton") picks the
implementation; it is not part of the state dict.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _NormBase

from fastsgd.nn.functional import check_ghost_batch_size, ghost_batch_norm


class _GhostBatchNorm(_NormBase):
    def __init__(self, num_features: int, ghost_batch_size: int = 32, eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.ghost_batch_size = check_ghost_batch_size(ghost_batch_size)
        # "auto": Triton on CUDA, vectorised torch ops elsewhere; set to
        # "torch" or "triton" to force one (tests, benchmarks).
        self.backend = "auto"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # momentum and num_batches_tracked exactly as nn.BatchNorm.forward.
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        if not self.training:
            # Inference never groups: running statistics, or (when there are
            # none) the statistics of the whole batch, as nn.BatchNorm.
            use_batch_stats = self.running_mean is None and self.running_var is None
            return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats,
                                factor, self.eps)
        return ghost_batch_norm(input, running_mean, running_var, self.weight, self.bias, True, factor, self.eps,
                                self.ghost_batch_size, backend=self.backend)


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over (N, C) or (N, C, L) input; see nn.BatchNorm1d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, H, W) input (NCHW or channels_last); see nn.BatchNorm2d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost batch norm over (N, C, D, H, W) input; see nn.BatchNorm3d."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
