#!/usr/bin/env python
"""`fastsgd throughput` from a source checkout: `python bench/throughput.py --help` lists the options."""
import sys

from fastsgd.study.cli import run_command


def main(argv=None) -> int:
    return run_command("throughput", argv, prog="bench/throughput.py")


if __name__ == "__main__":
    sys.exit(main())
