"""fastsgd.nn: ghost batch norm (Hoffer et al. 2017) as drop-in modules, a
functional form, and a converter for existing models.

    from fastsgd.nn import GhostBatchNorm2d, convert_ghost_batch_norm
    model = convert_ghost_batch_norm(torchvision_resnet50, ghost_batch_size=32)

Semantics are documented in :mod:`fastsgd.nn.functional`.
"""
from fastsgd.nn.convert import convert_ghost_batch_norm, revert_ghost_batch_norm
from fastsgd.nn.functional import ghost_batch_norm
from fastsgd.nn.modules import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d", "ghost_batch_norm",
           "convert_ghost_batch_norm", "revert_ghost_batch_norm"]
