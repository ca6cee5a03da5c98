"""The one table formatter: cell formats, text alignment, Markdown, bad alignment specs."""
import math

import pytest

from fastsgd.study.tables import format_table, format_value


def test_values():
    assert format_value(1024.0) == "1024"          # integral float: no 1.02e+03
    assert format_value(0.012345) == "0.0123"
    assert format_value(2.5e9) == "2.5e+09"
    assert format_value(None) == "" and format_value(math.nan, missing="n/a") == "n/a"
    assert format_value(math.inf) == "inf" and format_value(-math.inf) == "-inf"
    assert format_value(7) == "7" and format_value(True) == "True" and format_value("x") == "x"


def test_text_table_right_aligns_and_fills_missing():
    text = format_table([{"b": 8, "t": 0.5}, {"b": 1024, "t": None}], ["b", "t"], missing="-")
    assert text.splitlines() == ["   b    t",
                                 "----  ---",
                                 "   8  0.5",
                                 "1024    -"]


def test_markdown_table_with_left_column():
    md = format_table([{"k": "B*", "v": 64.0}], ["k", "v"], markdown=True, align="lr")
    assert md.splitlines() == ["| k | v |", "|---|---:|", "| B* | 64 |"]
    text = format_table([{"k": "B*", "v": 64.0}, {"k": "knee", "v": 2}], ["k", "v"], align="lr")
    assert text.splitlines()[2:] == ["B*    64", "knee   2"]


def test_bad_align_is_rejected():
    with pytest.raises(ValueError, match="one of 'l'/'r' per column"):
        format_table([], ["a", "b"], align="r")
    with pytest.raises(ValueError, match="one of 'l'/'r' per column"):
        format_table([], ["a"], align="c")
