#!/usr/bin/env python
"""`fastsgd steps` from a source checkout: `python bench/steps_to_result.py --help` lists the options."""
import sys

from fastsgd.study.cli import run_command


def main(argv=None) -> int:
    return run_command("steps", argv, prog="bench/steps_to_result.py")


if __name__ == "__main__":
    sys.exit(main())
