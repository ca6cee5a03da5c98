#!/usr/bin/env python
"""`fastsgd noise` from a source checkout: `python bench/predict_critical_batch.py --help` lists the options."""
import sys

from fastsgd.study.cli import run_command


def main(argv=None) -> int:
    return run_command("noise", argv, prog="bench/predict_critical_batch.py")


if __name__ == "__main__":
    sys.exit(main())
