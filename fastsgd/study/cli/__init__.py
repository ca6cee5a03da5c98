"""fastsgd: every job of the batch-size measuring harness as a subcommand.

    fastsgd throughput   time per training step against batch size (hardware)
    fastsgd steps        steps to result against batch size (algorithm)
    fastsgd noise        predict the critical batch size from the gradient noise scale of one run
    fastsgd report       combine a study, a throughput sweep and a prediction into one report
    fastsgd advise       all of it for one workload on this machine, ending in a batch size to use

Each subcommand lives in its own module with ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args, parser) -> exit code``. The scripts under ``bench/`` call :func:`main` with their
subcommand, so ``python bench/throughput.py`` and ``fastsgd throughput`` are the same program.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from fastsgd.backends import BackendUnavailable

COMMANDS = {
    "throughput": "fastsgd.study.cli.throughput",
    "steps": "fastsgd.study.cli.steps",
    "noise": "fastsgd.study.cli.noise",
    "report": "fastsgd.study.cli.report",
    "advise": "fastsgd.study.cli.advise",
}


def _command_parser(module, prog: str) -> argparse.ArgumentParser:
    doc = (module.__doc__ or "").strip()
    head, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=head, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastsgd", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        head, _, rest = doc.partition("\n\n")
        p = sub.add_parser(name, help=module.HELP, description=head, epilog=rest or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def _run(module, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        return module.run(args, parser)
    except (ValueError, FileNotFoundError, BackendUnavailable) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def run_command(name: str, argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    """Run one subcommand with its own parser (what the bench/ wrappers call)."""
    module = importlib.import_module(COMMANDS[name])
    parser = _command_parser(module, prog or f"fastsgd {name}")
    module.add_arguments(parser)
    return _run(module, parser.parse_args(argv), parser)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return _run(args._module, args, args._parser)


if __name__ == "__main__":
    sys.exit(main())
