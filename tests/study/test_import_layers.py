"""The core does not depend on the harness: ``import fastsgd`` leaves fastsgd.study unloaded,
and no module under kernels/, optim/, nn/, distributed/ imports it (not even lazily)."""
import ast
import os
import subprocess
import sys

import fastsgd

PACKAGE = os.path.dirname(os.path.abspath(fastsgd.__file__))
CORE = ("kernels", "optim", "nn", "distributed")


def test_import_fastsgd_does_not_load_study():
    code = ("import sys, fastsgd, fastsgd.noise_scale, fastsgd.optim, fastsgd.kernels\n"
            "print(sorted(m for m in sys.modules if m == 'fastsgd.study' or m.startswith('fastsgd.study.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _imported_modules(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_core_packages_do_not_import_study():
    offenders = []
    for sub in ("noise_scale.py",) + CORE:
        root = os.path.join(PACKAGE, sub)
        paths = [root] if root.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(root)
                                                       for f in fs if f.endswith(".py")]
        assert paths, f"nothing found at {root}"
        for p in paths:
            offenders += [f"{os.path.relpath(p, PACKAGE)}: {m}" for m in _imported_modules(p)
                          if m == "fastsgd.study" or m.startswith("fastsgd.study.")]
    assert not offenders, offenders
