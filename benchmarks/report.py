"""Benchmark output: rows of plain values written to ``benchmarks/results/<stem>.{csv,json}`` and printed as a table."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"


def save_rows(rows: Sequence[dict[str, Any]], stem: str, directory: Path = RESULTS) -> tuple[Path, Path]:
    """Write ``rows`` (same keys each) as CSV and JSON; returns both paths."""
    if not rows:
        raise ValueError("no benchmark rows to save")
    directory.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = directory / f"{stem}.csv", directory / f"{stem}.json"
    json_path.write_text(json.dumps(list(rows), indent=2) + "\n")
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, json_path


def print_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    """Print the chosen columns of ``rows`` as a table (floats to 3 significant digits, None as '-')."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if isinstance(rows[0].get(column), str) else "right")

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    for row in rows:
        table.add_row(*(cell(row.get(column)) for column in columns))
    Console(width=200).print(table)
