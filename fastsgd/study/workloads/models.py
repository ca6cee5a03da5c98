"""Model zoo for the batch-size study: the architectures of Shallue et al. 2019
and the usual CIFAR/ImageNet/language-model baselines, defined here so that no
weights or code are downloaded.

Every constructor builds a freshly initialised model on the CPU; call
``torch.manual_seed`` first for reproducibility. The input each model expects
is stated in its docstring; ``fastsgd.study.workloads.synthetic`` pairs each one with
synthetic inputs of that shape.

- ``SimpleCNN``     Shallue et al.'s "Simple CNN" for 28x28 images: 2 conv + 2 fully connected layers
- ``resnet8``       CIFAR ResNet (He et al. 2016, 6n+2 with n=1), 32x32 inputs
- ``resnet18``      ResNet-18, ``stem="cifar"`` (32x32, 3x3 stem, no max-pool) or ``stem="imagenet"`` (224x224)
- ``resnet50``      ResNet-50 with bottleneck blocks, ImageNet stem, 224x224
- ``GPTLanguageModel``  a GPT-style decoder-only Transformer (pre-LayerNorm, causal attention, tied head)
- ``MLP``           fully connected ReLU network on flat feature vectors
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")


class SimpleCNN(nn.Module):
    """Shallue et al. 2019's Simple CNN: conv5x5(filters[0]) -> max-pool ->
    conv5x5(filters[1]) -> max-pool -> FC(hidden) -> FC(num_classes), ReLU
    activations, "same" padding, 2x2 pooling with stride 2. Their base widths
    are 32, 64 and 1024 for (Fashion) MNIST.

    Input: (B, in_channels, image_size, image_size); output: (B, num_classes) logits.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10,
                 filters: Sequence[int] = (32, 64), hidden: int = 1024):
        super().__init__()
        _check_positive(in_channels=in_channels, image_size=image_size, num_classes=num_classes, hidden=hidden)
        if len(filters) != 2:
            raise ValueError(f"Invalid filters: {tuple(filters)!r} (the Simple CNN has exactly 2 conv layers)")
        if image_size % 4:
            raise ValueError(f"Invalid image_size: {image_size} (two 2x2 poolings need a multiple of 4)")
        self.conv1 = nn.Conv2d(in_channels, filters[0], 5, padding=2)
        self.conv2 = nn.Conv2d(filters[0], filters[1], 5, padding=2)
        self.fc1 = nn.Linear(filters[1] * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carrying the stride, as in torchvision's "ResNet v1.5") -> 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """A residual network: stem, stages of blocks (the first block of every
    stage after the first halves the resolution), global average pool, linear.

    ``stem="cifar"``: one 3x3 conv, stride 1 (32x32 inputs).
    ``stem="imagenet"``: 7x7 conv stride 2 + 3x3 max-pool stride 2 (224x224 inputs).
    """

    def __init__(self, block: type, blocks_per_stage: Sequence[int], widths: Sequence[int], *,
                 stem: str = "cifar", in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes)
        if len(blocks_per_stage) != len(widths) or not widths:
            raise ValueError(f"Invalid ResNet stages: {len(blocks_per_stage)} block counts for {len(widths)} widths")
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU())
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            raise ValueError(f"Invalid stem: {stem!r}; choose 'cifar' or 'imagenet'")
        stages, in_planes = [], widths[0]
        for i, (n, planes) in enumerate(zip(blocks_per_stage, widths)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                stages.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet8(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """CIFAR ResNet-8: 3 stages of one basic block, 16/32/64 channels. Input (B, 3, 32, 32)."""
    return ResNet(BasicBlock, (1, 1, 1), (16, 32, 64), stem="cifar", in_channels=in_channels,
                  num_classes=num_classes)


def resnet18(num_classes: int = 10, stem: str = "cifar", in_channels: int = 3) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2, 64..512 channels). Input (B, 3, 32, 32)
    with ``stem="cifar"``, (B, 3, 224, 224) with ``stem="imagenet"``."""
    return ResNet(BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), stem=stem, in_channels=in_channels,
                  num_classes=num_classes)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ResNet-50 (bottleneck blocks 3-4-6-3, ImageNet stem). Input (B, 3, 224, 224)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), stem="imagenet", in_channels=in_channels,
                  num_classes=num_classes)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTLanguageModel(nn.Module):
    """A GPT-style decoder-only language model: token + learned position
    embeddings, ``n_layers`` pre-LN Transformer blocks with causal attention,
    a final LayerNorm and an output layer tied to the token embedding.

    Input: (B, T) token ids with T <= seq_len; output: (B, T, vocab_size) logits.
    The default is small (about 0.5 M parameters) so that it runs on a CPU.
    """

    def __init__(self, vocab_size: int = 1024, seq_len: int = 64, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        _check_positive(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model, n_layers=n_layers,
                        n_heads=n_heads)
        if d_model % n_heads:
            raise ValueError(f"Invalid n_heads: {n_heads} (must divide d_model={d_model})")
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.Sequential(*[TransformerBlock(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # weight tying, as in GPT-2

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len={self.seq_len}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.ln_f(self.blocks(x)))


class MLP(nn.Module):
    """Fully connected ReLU network. Input: (B, in_features) (or any shape
    flattening to it); output: (B, num_classes) logits."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (512, 512), num_classes: int = 10):
        super().__init__()
        _check_positive(in_features=in_features, num_classes=num_classes)
        _check_positive(**{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        sizes = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))
