"""The one table formatter: plain text for terminals (first column left-aligned, the rest right-aligned) or
Markdown for docs/. Used by the CLI, `peft_abmll.experiment` and the benchmark scripts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    markdown: bool = False,
    min_widths: Optional[Sequence[int]] = None,
    sep: str = " ",
) -> str:
    """`rows` of already formatted cells under `header`.

    Plain text pads each column to its widest cell (at least ``min_widths[i]``, for the first columns given) and
    joins cells with `sep`;
    Markdown ignores widths. Every row must have as many cells as the header.
    """
    bad = [i for i, row in enumerate(rows) if len(row) != len(header)]
    if bad:
        raise ValueError(f"Table row {bad[0]} has {len(rows[bad[0]])} cells, the header {len(header)}.")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    floor = [*(min_widths or ()), *[0] * len(header)][: len(header)]  # missing widths: 0
    widths = [max([floor[i], len(header[i]), *(len(row[i]) for row in rows)]) for i in range(len(header))]
    return "\n".join(
        sep.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    )
