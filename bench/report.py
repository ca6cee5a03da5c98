#!/usr/bin/env python
"""`fastsgd report` from a source checkout: `python bench/report.py --help` lists the options."""
import sys

from fastsgd.study.cli import run_command


def main(argv=None) -> int:
    return run_command("report", argv, prog="bench/report.py")


if __name__ == "__main__":
    sys.exit(main())
