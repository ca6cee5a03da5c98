"""tests/optim: the shared test helpers in tests/ (kernel_cases) import from here too.

pytest puts a test file's own folder on sys.path (rootdir-relative "prepend"
import mode, no __init__.py files), which for this folder is tests/optim."""
import pathlib
import sys

_TESTS = str(pathlib.Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
