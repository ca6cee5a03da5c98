"""convert_ghost_batch_norm checks the whole model before it converts anything."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsgd.nn import GhostBatchNorm2d, convert_ghost_batch_norm


def _types(model):
    return [type(m) for m in model.modules()]


def test_sync_batch_norm_after_a_batch_norm_converts_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.SyncBatchNorm(4)))
    before = _types(model)
    with pytest.raises(TypeError, match=r"SyncBatchNorm .at 3\.1."):
        convert_ghost_batch_norm(model, 8)
    assert _types(model) == before
    assert type(model[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("lazy_cls", [nn.LazyBatchNorm1d, nn.LazyBatchNorm2d, nn.LazyBatchNorm3d])
def test_uninitialised_lazy_batch_norm_is_refused_and_nothing_converted(lazy_cls):
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Sequential(nn.Identity(), lazy_cls()))
    before = _types(model)
    with pytest.raises(TypeError, match=rf"{lazy_cls.__name__} .at 1\.1.*forward pass"):
        convert_ghost_batch_norm(model, 8)
    assert _types(model) == before


def test_lazy_batch_norm_after_its_first_forward_is_converted():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LazyBatchNorm2d())
    model(torch.randn(2, 3, 6, 6))  # materialises it: it becomes an nn.BatchNorm2d
    converted = convert_ghost_batch_norm(model, 8)
    assert type(converted[1]) is GhostBatchNorm2d and converted[1].num_features == 4


def test_other_lazy_norms_are_left_alone():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.LazyInstanceNorm2d())
    converted = convert_ghost_batch_norm(model, 8)
    assert type(converted[0]) is GhostBatchNorm2d and type(converted[1]) is nn.LazyInstanceNorm2d
