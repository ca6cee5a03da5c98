"""Shared test setup: the Triton mode, the device fixture, GPU requirements.

Loaded by pytest before any test module, so the choices below are made before
triton is first imported:

- Triton fixes compiled vs interpreted when a kernel is defined (its own
  tl.sum, tl.philox included), reading TRITON_INTERPRET at import. Without a
  CUDA device the Triton kernels run on CPU tensors through the interpreter,
  so TRITON_INTERPRET=1 is set here, once, for the whole session; with a
  device they are compiled for it.
- This directory is on sys.path (pytest's default "prepend" import mode puts
  the directory of a conftest.py without __init__.py there), so the test
  modules import the shared helpers as ``import kernel_cases`` and
  ``import requirements``.
- ``FASTSGD_REQUIRE_GPU=1`` (bench/gpu_session.sh sets it) turns every "no
  GPU / no cuda backend / no triton" skip into a failure: see requirements.py.
  Tests that need a GPU carry ``@pytest.mark.gpu`` (``gpu(backend="cuda")``
  when they also need the cuda backend) or call ``requirements.missing``.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import requirements  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu(backend=None): needs a CUDA device (and the named GPU backend); "
                                       "a failure instead of a skip under FASTSGD_REQUIRE_GPU=1")


def pytest_report_header(config):
    return [f"fastsgd tests: cuda device {requirements.HAS_GPU}, TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', '')}, FASTSGD_REQUIRE_GPU={int(requirements.REQUIRE_GPU)}"]


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("gpu")
    if marker is not None:
        requirements.gpu(marker.kwargs.get("backend"))


@pytest.fixture
def device() -> torch.device:
    """Where device tests run: the CUDA device when there is one, else the CPU
    (the Triton interpreter and the CUDA emulator run the kernels there)."""
    return torch.device("cuda") if requirements.HAS_GPU else torch.device("cpu")


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device, or a skip (a failure under FASTSGD_REQUIRE_GPU=1)."""
    requirements.gpu()
    return torch.device("cuda")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small-tensor tests: on a shared, oversubscribed CPU, OpenMP threads
    waiting for each other turn sub-millisecond steps into slow and noisy ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
