"""Argument types shared by the ``fastsgd`` subcommands, so every command reads a batch-size list, a
device, a workload or an optimizer the same way and rejects bad input with the same words."""
from __future__ import annotations

import argparse
import json
import os
from typing import List

import torch


def batch_sizes(text: str) -> List[int]:
    """``"8..4096"`` -> the powers of two from 8 to 4096; ``"8,24,100"`` -> those; parts mix
    (``"8..64,100"``). The result is sorted, without repeats."""
    out: List[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if ".." in part:
                lo, hi = (int(v) for v in part.split(".."))
                if lo < 1 or hi < lo:
                    raise ValueError
                powers = [2 ** k for k in range(hi.bit_length()) if lo <= 2 ** k <= hi]
                if not powers:
                    raise ValueError
                out += powers
            else:
                out.append(int(part))
        if not out or min(out) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid batch sizes {text!r}: write LO..HI for the powers of two in that range (e.g. 8..4096, "
            "which must contain one), a comma-separated list of positive integers (e.g. 8,24,100), or both "
            "(8..64,100)") from None
    return sorted(set(out))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"invalid device {text!r}: write cpu, cuda or cuda:N") from None


def optimizer_spec(text: str) -> str:
    from fastsgd.study.optimizers import parse_optimizer_spec

    try:
        parse_optimizer_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def json_value(text: str):
    """A JSON file's path or a JSON string."""
    if text is None:
        return None
    if os.path.exists(text):
        with open(text) as f:
            return json.load(f)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"neither a file nor valid JSON: {exc}") from None


WORKLOAD_HELP = ("a bundled workload (mnist1d-mlp, mnist1d-cnn, digits-mlp, least-squares, ...) or your own as "
                 "package.module:factory, where factory() returns a fastsgd.study.Workload")


def set_threads(threads) -> None:
    if threads:
        torch.set_num_threads(threads)


def safe_name(name: str) -> str:
    """A workload or model name as a directory name (``pkg.mod:factory`` -> ``pkg.mod-factory``)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
