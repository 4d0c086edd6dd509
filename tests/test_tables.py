"""The one table formatter."""

from __future__ import annotations

import pytest

from peft_abmll.tables import render_table


def test_plain_text_pads_columns_to_the_widest_cell() -> None:
    text = render_table(["name", "n"], [["abmll", "5"], ["a", "1234"]], min_widths=[6, 0])
    assert text.splitlines() == ["name      n", "abmll     5", "a      1234"]
    assert render_table(["name", "n"], [["abmll", "5"]], min_widths=[8]).splitlines()[1] == "abmll    5"


def test_markdown_has_a_separator_row_and_ignores_widths() -> None:
    text = render_table(["a", "b"], [["1", "2"]], markdown=True, min_widths=[9, 9])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_a_row_with_the_wrong_number_of_cells_is_refused() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        render_table(["a", "b"], [["1", "2"], ["3"]])
