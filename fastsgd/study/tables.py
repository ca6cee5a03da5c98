"""The one table formatter of the harness and the benchmarks: plain aligned text for the
terminal, or a Markdown table for reports.

:func:`format_value` is the number format every table (and the report's sentences) uses:
integral floats as integers, other floats with a ``.3g``-style spec, None and NaN as a
placeholder.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

__all__ = ["format_value", "format_table"]


def format_value(v: Any, spec: str = ".3g", missing: str = "") -> str:
    """One cell: ``missing`` for None and NaN, ``inf``/``-inf``, integral floats below 1e9
    as integers (1024.0 -> "1024", not "1.02e+03"), other floats with ``spec``, anything else
    with ``str``."""
    if v is None:
        return missing
    if isinstance(v, float):
        if math.isnan(v):
            return missing
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v.is_integer() and abs(v) < 1e9:
            return str(int(v))
        return format(v, spec)
    return str(v)


def format_table(rows: Sequence[Dict[str, Any]], columns: Sequence[str], *, markdown: bool = False,
                 spec: str = ".3g", missing: str = "", align: Optional[str] = None) -> str:
    """``columns`` of ``rows`` (dicts; a missing key is a missing value) as a table.

    Text: a header, a dash rule, columns separated by two spaces. Markdown: a pipe table.
    ``align`` has one letter per column, ``l`` or ``r`` (default: all right-aligned, the
    right choice for numbers).
    """
    align = align or "r" * len(columns)
    if len(align) != len(columns) or set(align) - {"l", "r"}:
        raise ValueError(f"align needs one of 'l'/'r' per column ({len(columns)}), got {align!r}")
    body = [[format_value(r.get(c), spec, missing) for c in columns] for r in rows]
    if markdown:
        rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
        lines = ["| " + " | ".join(columns) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])

    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()
    return "\n".join([line(columns), "  ".join("-" * w for w in widths)] + [line(b) for b in body])
