"""What a report is made of: tables and sections, their cells, and their markdown and html.

Light (no plotting library): every stage that declares report sections formats its cells with
`percent` and `number`, so that all tables of a report print numbers alike.
"""

from __future__ import annotations

import html

Table = tuple[list[str], list[list[str]]]  # a report table: header, rows
Section = tuple[str, Table]  # a report section: its heading and its table


def percent(value: float | None) -> str:
    """A share as a percentage with one decimal; "–" for none."""
    return "–" if value is None else f"{100 * value:.1f}%"


def number(value: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals; "–" for none."""
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def html_table(table: Table) -> str:
    headers, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
