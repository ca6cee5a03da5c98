"""The test command installs fastsgd._C (with the CUDA emulation) and triton:
when either does not import, the suite fails here instead of skipping the
tests that need them (a skip must never hide a broken build)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_native_module_imports():
    from fastsgd._native import native, native_error
    assert native() is not None, native_error()
    from fastsgd.backends import available_backends
    assert available_backends()["cpu"] is None, available_backends()["cpu"]


@pytest.mark.skipif(os.name == "nt", reason="the CUDA emulation needs POSIX ucontext and is not built on Windows")
def test_cuda_emulation_imports():
    import fastsgd._cuda_emu  # noqa: F401


def test_triton_imports():
    import triton  # noqa: F401


def test_require_gpu_turns_gpu_skips_into_failures(tmp_path):
    """Under FASTSGD_REQUIRE_GPU=1 a test marked ``gpu`` and the
    ``requirements`` helpers fail on a machine without a GPU; without the
    switch they skip."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests run instead of skipping")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "test_needs_gpu.py").write_text(
        "import pytest\nimport requirements\n\n"
        "@pytest.mark.gpu\ndef test_marked():\n    pass\n\n"
        "def test_helper():\n    requirements.gpu('cuda')\n")
    results = {}
    for require in ("0", "1"):
        # tests/conftest.py loaded as a plugin (-p), its directory on the path for `import requirements`.
        env = dict(os.environ, FASTSGD_REQUIRE_GPU=require, PYTHONPATH=tests_dir)
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                               "-rA", str(tmp_path)], env=env, capture_output=True, text=True, cwd=tmp_path)
        results[require] = (proc.returncode, proc.stdout)
    assert results["0"][0] == 0 and "2 skipped" in results["0"][1], results["0"][1]
    # the marker fails the setup (an error), the helper the test body (a failure)
    assert results["1"][0] == 1 and "1 failed, 1 error" in results["1"][1], results["1"][1]
    assert "FASTSGD_REQUIRE_GPU=1 but needs a CUDA device" in results["1"][1]
