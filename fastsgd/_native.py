"""Loads the compiled module fastsgd._C once, keeping the reason if it is missing.

The ImportError is kept, not raised: ``backend="auto"`` quietly uses what is
there, and only an explicit request for a native backend raises it.
"""
from __future__ import annotations

from typing import Any, Optional

_module: Any = None
_error: Optional[str] = None
_loaded = False


def native() -> Any:
    """fastsgd._C, or None when it could not be imported (see ``native_error``)."""
    global _module, _error, _loaded
    if not _loaded:
        _loaded = True
        try:
            from fastsgd import _C  # type: ignore[attr-defined]
            _module = _C
        except ImportError as exc:  # not built, or built for another Python
            _error = (f"the native module fastsgd._C could not be imported ({exc}); "
                      "reinstall with `pip install .` so CMake builds it")
    return _module


def native_error() -> Optional[str]:
    native()
    return _error
