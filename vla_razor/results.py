"""The results table: one row per evaluated checkpoint, shared by every path's sweep, frontier and report.

Rows are flat dicts (method, hyperparameters, step, new-task score, prior-task score, forgetting, every predictor).
Files are CSV so users can open them anywhere; writes are atomic (temp file + rename) so a killed job never
leaves a half-written table behind.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

NUMERIC_NAN = float("nan")


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` atomically; columns are the union of keys, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def _parse(value: str):
    if value == "":
        return NUMERIC_NAN
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a table written by :func:`write_rows`, numbers parsed back to int/float."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"results table {path} does not exist; run the sweep first")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ValueError(f"{path} is empty or not a results table (no header)")
        return [{key: _parse(value) for key, value in row.items()} for row in reader]


def read_tables(paths) -> list[dict]:
    """Concatenate several tables (e.g. one per sweep group)."""
    return [row for path in sorted(paths) for row in read_rows(path)]


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
