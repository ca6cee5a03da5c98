"""What a test needs from the machine: skip without it, or fail under
``FASTSGD_REQUIRE_GPU=1``.

On a machine without a GPU the GPU tests skip. On the machine that is meant
to have one (bench/gpu_session.sh), a skip there would be a false green: the
run would pass without having tested anything. ``FASTSGD_REQUIRE_GPU=1``
makes each of these skips a failure that names what was missing.
"""
from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

REQUIRE_GPU = os.environ.get("FASTSGD_REQUIRE_GPU", "") == "1"
HAS_GPU = torch.cuda.is_available()


def missing(reason: str) -> None:
    """Skip the test, or fail it under FASTSGD_REQUIRE_GPU=1."""
    if REQUIRE_GPU:
        pytest.fail(f"FASTSGD_REQUIRE_GPU=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def gpu(backend: Optional[str] = None, count: int = 1) -> None:
    """Requires ``count`` CUDA devices and, when named, an available GPU backend."""
    if not HAS_GPU:
        missing("needs a CUDA device (torch.cuda.is_available() is False)")
    if torch.cuda.device_count() < count:
        missing(f"needs {count} CUDA devices, found {torch.cuda.device_count()}")
    if backend is not None:
        from fastsgd.backends import available_backends
        reason = available_backends()[backend]
        if reason is not None:
            missing(f"needs the {backend} backend: {reason}")


def triton():
    """The triton module, or a skip / failure (FASTSGD_REQUIRE_GPU=1) when it is not installed."""
    try:
        import triton as module
    except ImportError as exc:
        missing(f"triton is not installed ({exc})")
    return module
