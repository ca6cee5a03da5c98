"""Swap nn.BatchNorm1d/2d/3d for GhostBatchNorm1d/2d/3d in a model and back.

The new module takes over the old one's parameter and buffer tensors
themselves (not copies), so weights, running statistics, num_batches_tracked,
device, dtype and any optimizer already holding the parameters stay valid;
the training flag is carried over. Like
``nn.SyncBatchNorm.convert_sync_batchnorm`` it works in place (children are
swapped inside ``module``) and replaces the root too when it is itself a
batch norm, so always use the returned module.

nn.SyncBatchNorm is refused with a clear error rather than converted or
skipped: it shares statistics across processes, a ghost batch lives inside
one process, and silently choosing either would change the training recipe.
Convert before ``convert_sync_batchnorm`` (which leaves GhostBatchNorm alone).
"""
from __future__ import annotations

from torch import nn

from fastsgd.nn.functional import check_ghost_batch_size
from fastsgd.nn.modules import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

_TO_GHOST = ((nn.BatchNorm1d, GhostBatchNorm1d), (nn.BatchNorm2d, GhostBatchNorm2d),
             (nn.BatchNorm3d, GhostBatchNorm3d))


def _take_over(old: nn.Module, new: nn.Module) -> nn.Module:
    for name in ("weight", "bias"):
        setattr(new, name, getattr(old, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = old._buffers.get(name)
    new.train(old.training)
    return new


def _swap(module: nn.Module, make) -> nn.Module:
    replaced = make(module)
    if replaced is not None:
        return replaced
    for name, child in module.named_children():
        new_child = _swap(child, make)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _meta_kwargs(bn: nn.Module) -> dict:
    return dict(eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats,
                device="meta")


def convert_ghost_batch_norm(module: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d in ``module`` (recursively, the root
    included) by the GhostBatchNorm of the same dimension with
    ``ghost_batch_size``; returns the converted module."""
    g = check_ghost_batch_size(ghost_batch_size)

    def make(m: nn.Module):
        if isinstance(m, nn.SyncBatchNorm):
            raise TypeError("convert_ghost_batch_norm: found nn.SyncBatchNorm, which shares statistics across "
                            "processes while ghost batches are per process; convert the model before "
                            "nn.SyncBatchNorm.convert_sync_batchnorm (it leaves GhostBatchNorm alone)")
        for bn_cls, ghost_cls in _TO_GHOST:
            if isinstance(m, bn_cls):
                return _take_over(m, ghost_cls(m.num_features, g, **_meta_kwargs(m)))
        return None

    return _swap(module, make)


def revert_ghost_batch_norm(module: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_ghost_batch_norm`: every GhostBatchNorm
    becomes the nn.BatchNorm of the same dimension with the same tensors."""
    def make(m: nn.Module):
        for bn_cls, ghost_cls in _TO_GHOST:
            if isinstance(m, ghost_cls):
                return _take_over(m, bn_cls(m.num_features, **_meta_kwargs(m)))
        return None

    return _swap(module, make)
