"""Swap nn.BatchNorm1d/2d/3d for GhostBatchNorm1d/2d/3d in a model and back.

The new module takes over the old one's parameter and buffer tensors
themselves (not copies), so weights, running statistics, num_batches_tracked,
device, dtype and any optimizer already holding the parameters stay valid;
the training flag is carried over. Like
``nn.SyncBatchNorm.convert_sync_batchnorm`` it works in place (children are
swapped inside ``module``) and replaces the root too when it is itself a
batch norm, so always use the returned module.

The whole model is checked before anything is swapped, so a refusal leaves
it exactly as it was:
- nn.SyncBatchNorm is refused rather than converted or skipped: it shares
  statistics across processes, a ghost batch lives inside one process, and
  silently choosing either would change the training recipe. Convert before
  ``convert_sync_batchnorm`` (which leaves GhostBatchNorm alone).
- nn.LazyBatchNorm1d/2d/3d not yet run is refused: its number of features is
  unknown until the first forward pass, which turns it into nn.BatchNorm1d/2d/3d
  (then it converts like any other).
"""
from __future__ import annotations

from torch import nn

from fastsgd.nn.functional import check_ghost_batch_size
from fastsgd.nn.modules import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

_TO_GHOST = ((nn.BatchNorm1d, GhostBatchNorm1d), (nn.BatchNorm2d, GhostBatchNorm2d),
             (nn.BatchNorm3d, GhostBatchNorm3d))

_LAZY = (nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)


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


def _check_convertible(module: nn.Module) -> None:
    for name, m in module.named_modules():
        where = f"{type(m).__name__} (at {name or 'the root'})"
        if isinstance(m, nn.SyncBatchNorm):
            raise TypeError(f"convert_ghost_batch_norm: found nn.{where}, which shares statistics across "
                            "processes while ghost batches are per process; convert the model before "
                            "nn.SyncBatchNorm.convert_sync_batchnorm (it leaves GhostBatchNorm alone). "
                            "Nothing was converted")
        if isinstance(m, _LAZY):  # after its first forward it is an nn.BatchNorm*d
            raise TypeError(f"convert_ghost_batch_norm: found nn.{where}, whose number of features is not known "
                            "yet; run one forward pass first (it then becomes an nn.BatchNorm, which converts). "
                            "Nothing was converted")


def convert_ghost_batch_norm(module: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d/3d in ``module`` (recursively, the root
    included) by the GhostBatchNorm of the same dimension with
    ``ghost_batch_size``; returns the converted module. Raises before
    changing anything if the model holds nn.SyncBatchNorm or a LazyBatchNorm
    that has not run yet."""
    g = check_ghost_batch_size(ghost_batch_size)
    _check_convertible(module)

    def make(m: nn.Module):
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
