"""Workloads with synthetic inputs, for measuring step time against batch size.

Step time does not depend on what the pixels or tokens are, only on their
shape, so these workloads draw random inputs and labels of the right shape
instead of reading a data set (nothing is downloaded). They are ordinary
``fastsgd.study.workloads.base.Workload`` objects (``evaluate=None``: there is no
held-out data to score), so the steps-to-result study can take their models.

Names (``synthetic_workload(name, **options)``):

- ``simple-cnn``      Shallue et al.'s Simple CNN, 28x28x1 images, 10 classes
- ``mlp``             MLP on 784 features (options: in_features, hidden, num_classes)
- ``resnet8``         CIFAR ResNet-8, 32x32x3, 10 classes
- ``resnet18-cifar``  ResNet-18 with the CIFAR stem, 32x32x3, 10 classes
- ``resnet18``        ResNet-18, ImageNet 224x224x3, 1000 classes
- ``resnet50``        ResNet-50, ImageNet 224x224x3, 1000 classes
- ``transformer``     GPT-style language model; one example is one sequence of
                      ``seq_len`` tokens (options: vocab_size, seq_len, d_model, n_layers, n_heads)
- ``torchvision:NAME`` / ``timm:NAME``  a model from those packages when they are
                      installed (options: image_size, num_classes)

Options are passed to the model constructor; an unknown option is an error
that lists the valid ones.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastsgd.study.workloads import models
from fastsgd.study.workloads.base import Workload

# name -> (one-line description, model constructor, fixed constructor kwargs, shape of one example)
_IMAGE_MODELS: Dict[str, Tuple[str, Callable[..., nn.Module], Dict[str, Any], Tuple[int, ...]]] = {
    "simple-cnn": ("Shallue et al. Simple CNN (2 conv + 2 FC), 28x28x1", models.SimpleCNN, {}, (1, 28, 28)),
    "mlp": ("MLP 784-512-512-10", models.MLP, {}, (784,)),
    "resnet8": ("ResNet-8, CIFAR 32x32x3", models.resnet8, {}, (3, 32, 32)),
    "resnet18-cifar": ("ResNet-18, CIFAR 32x32x3", models.resnet18, {"stem": "cifar"}, (3, 32, 32)),
    "resnet18": ("ResNet-18, ImageNet 224x224x3", models.resnet18, {"stem": "imagenet", "num_classes": 1000},
                 (3, 224, 224)),
    "resnet50": ("ResNet-50, ImageNet 224x224x3", models.resnet50, {}, (3, 224, 224)),
}

WORKLOADS: Dict[str, str] = {name: spec[0] for name, spec in _IMAGE_MODELS.items()}
WORKLOADS["transformer"] = "GPT-style Transformer LM (2 layers, d=128, 64 tokens, vocab 1024)"
WORKLOADS["torchvision:NAME"] = "a torchvision model, 224x224x3 (needs torchvision)"
WORKLOADS["timm:NAME"] = "a timm model, 224x224x3 (needs timm)"


def synthetic_workload(name: str, **options: Any) -> Workload:
    """The synthetic-input workload called ``name`` (see the module docstring)."""
    if name.startswith("torchvision:") or name.startswith("timm:"):
        package, _, model_name = name.partition(":")
        return _external_workload(package, model_name, **options)
    if name == "transformer":
        _check_options(name, models.GPTLanguageModel, options)
        return _language_model_workload(**options)
    if name not in _IMAGE_MODELS:
        raise ValueError(f"Unknown workload {name!r}; choose one of: {', '.join(WORKLOADS)}")
    description, constructor, fixed, shape = _IMAGE_MODELS[name]
    _check_options(name, constructor, options, fixed=fixed)
    kwargs = {**fixed, **options}
    num_classes = kwargs.get("num_classes", inspect.signature(constructor).parameters["num_classes"].default)
    if name == "mlp":
        shape = (kwargs.get("in_features", 784),)
        description = "MLP " + "-".join(map(str, (*shape, *kwargs.get("hidden", (512, 512)), num_classes)))
    else:
        description = _describe(description, options)
    return classification_workload(name, lambda: constructor(**kwargs), shape, num_classes,
                                   description=description, options=options)


def classification_workload(name: str, make_model: Callable[[], nn.Module], example_shape: Sequence[int],
                            num_classes: int, *, description: str = "",
                            options: Optional[Dict[str, Any]] = None) -> Workload:
    """A workload whose examples are random normal tensors of ``example_shape``
    with uniformly random labels in [0, num_classes), scored by cross-entropy."""
    example_shape = tuple(example_shape)

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device) -> Tuple[Tensor, Tensor]:
        x = torch.randn((batch_size, *example_shape), generator=generator, device=generator.device)
        y = torch.randint(num_classes, (batch_size,), generator=generator, device=generator.device)
        return x.to(device), y.to(device)

    return Workload(name=name, make_model=make_model, sample_batch=sample_batch, loss=F.cross_entropy,
                    info={"description": description, "example_shape": list(example_shape),
                          "num_classes": num_classes, "example": "image" if len(example_shape) == 3 else "vector",
                          "options": dict(options or {})})


def _language_model_workload(**options: Any) -> Workload:
    seq_len = options.get("seq_len", 64)
    vocab_size = options.get("vocab_size", 1024)

    def sample_batch(batch_size: int, generator: torch.Generator, device: torch.device) -> Tuple[Tensor, Tensor]:
        tokens = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=generator, device=generator.device)
        tokens = tokens.to(device)
        return tokens[:, :-1], tokens[:, 1:]  # next-token prediction

    def loss(logits: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    return Workload(name="transformer", make_model=lambda: models.GPTLanguageModel(**options),
                    sample_batch=sample_batch, loss=loss,
                    info={"description": _describe("GPT-style Transformer LM", options) if options else
                          WORKLOADS["transformer"], "example_shape": [seq_len],
                          "vocab_size": vocab_size, "example": f"sequence of {seq_len} tokens",
                          "options": dict(options)})


def _external_workload(package: str, model_name: str, *, image_size: int = 224, num_classes: int = 1000,
                       **unknown: Any) -> Workload:
    if unknown:
        raise ValueError(f"Unknown option(s) {', '.join(sorted(unknown))} for {package}:{model_name}; "
                         "valid: image_size, num_classes")
    if not model_name:
        raise ValueError(f"Missing model name: write {package}:NAME, e.g. {package}:resnet50")
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ValueError(f"{package}:{model_name} needs the {package} package, which cannot be imported here "
                         f"({exc}). Install it (pip install {package}) or use a built-in workload: "
                         f"{', '.join(n for n in WORKLOADS if ':' not in n)}") from None

    if package == "torchvision":
        def make_model() -> nn.Module:
            return module.models.get_model(model_name, weights=None, num_classes=num_classes)
    else:
        def make_model() -> nn.Module:
            return module.create_model(model_name, pretrained=False, num_classes=num_classes)
    try:  # fail now, with the package's own message, rather than in the middle of a sweep
        make_model()
    except Exception as exc:
        raise ValueError(f"{package} cannot build {model_name!r}: {exc}") from None
    return classification_workload(f"{package}:{model_name}", make_model, (3, image_size, image_size), num_classes,
                                   description=f"{package} {model_name}, {image_size}x{image_size}x3",
                                   options={"image_size": image_size, "num_classes": num_classes})


def _describe(description: str, options: Dict[str, Any]) -> str:
    if not options:
        return description
    return f"{description} ({', '.join(f'{k}={v}' for k, v in options.items())})"


def _check_options(name: str, constructor: Callable, options: Dict[str, Any],
                   fixed: Optional[Dict[str, Any]] = None) -> None:
    valid = [p for p in inspect.signature(constructor).parameters if p not in (fixed or {})]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {', '.join(unknown)} for workload {name!r}; valid: {', '.join(valid)}")
