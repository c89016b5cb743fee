"""What `wren data check` found: problems with their file:line, and size statistics.

Kept apart from the reading and the rules (`formats.py`) so both the checker and the training
data preparation can hold problems without importing each other.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_PRINTED_PROBLEMS = 50


@dataclass(frozen=True)
class Problem:
    """One bad line. `line` is 1-based, as editors count."""

    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Summary:
    """min / mean / median / p95 / max of one measurement over rows."""

    count: int
    min: float
    mean: float
    median: float
    p95: float
    max: float

    @classmethod
    def of(cls, values: array | list[int]) -> Summary | None:
        if len(values) == 0:
            return None
        data = np.asarray(values, dtype=np.float64)
        return cls(
            count=len(data),
            min=float(data.min()),
            mean=float(data.mean()),
            median=float(np.median(data)),
            p95=float(np.percentile(data, 95)),
            max=float(data.max()),
        )


def _int_array() -> array:
    # Compact per-row numbers: a 10M-row corpus costs 80 MB here, not a list of Python ints.
    return array("q")


@dataclass
class FileReport:
    """One file's numbers. `kind` is None when no row said what the file holds."""

    path: Path
    kind: str | None = None
    rows: int = 0
    valid_rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    chars: array = field(default_factory=_int_array)  # per valid row
    turns: array = field(default_factory=_int_array)  # per valid conversation (sft, preference)
    tokens: array = field(default_factory=_int_array)  # per valid row, with a tokenizer
    trained_tokens: int = 0  # tokens that carry a loss (assistant replies, or all of pretraining)


@dataclass
class CheckReport:
    files: list[FileReport]
    tokenized: bool = False

    @property
    def problems(self) -> list[Problem]:
        return [problem for report in self.files for problem in report.problems]

    @property
    def ok(self) -> bool:
        return not any(report.problems for report in self.files)

    @property
    def rows(self) -> int:
        return sum(report.rows for report in self.files)

    @property
    def valid_rows(self) -> int:
        return sum(report.valid_rows for report in self.files)

    @property
    def total_tokens(self) -> int:
        return sum(sum(report.tokens) for report in self.files)

    def summary(self, measure: str) -> Summary | None:
        """Statistics of "chars", "turns" or "tokens" over every file together."""
        merged = _int_array()
        for report in self.files:
            merged.extend(getattr(report, measure))
        return Summary.of(merged)


def format_check_report(report: CheckReport, max_problems: int = MAX_PRINTED_PROBLEMS) -> str:
    """The report as `wren data check` prints it: each file, the total, then the problems (the
    first `max_problems` of them, and a count of the rest)."""
    lines: list[str] = []
    for file in report.files:
        lines.append(f"{file.path} ({file.kind or 'unknown kind'})")
        lines.extend(
            _numbers(file.rows, file.valid_rows, len(file.problems), _measures(file), report.tokenized)
        )
        if report.tokenized:
            lines.append(f"  tokens {sum(file.tokens):,}, of which trained {file.trained_tokens:,}")
    if len(report.files) > 1:
        lines.append(f"total ({len(report.files)} files)")
        measures = {name: report.summary(name) for name in ("chars", "turns", "tokens")}
        lines.extend(
            _numbers(report.rows, report.valid_rows, len(report.problems), measures, report.tokenized)
        )
        if report.tokenized:
            trained = sum(file.trained_tokens for file in report.files)
            lines.append(f"  tokens {report.total_tokens:,}, of which trained {trained:,}")
    problems = report.problems
    if problems:
        lines.append(f"{len(problems):,} problem{'s' if len(problems) != 1 else ''}:")
        lines.extend(f"  {problem}" for problem in problems[:max_problems])
        if len(problems) > max_problems:
            lines.append(f"  ... and {len(problems) - max_problems:,} more")
    else:
        lines.append("no problems")
    return "\n".join(lines)


def _measures(file: FileReport) -> dict[str, Summary | None]:
    return {name: Summary.of(getattr(file, name)) for name in ("chars", "turns", "tokens")}


def _numbers(
    rows: int, valid: int, problems: int, measures: dict[str, Summary | None], tokenized: bool
) -> list[str]:
    lines = [f"  rows {rows:,}, valid {valid:,}, problems {problems:,}"]
    labels = {"chars": "characters per row", "turns": "turns per conversation", "tokens": "tokens per row"}
    for name, label in labels.items():
        summary = measures[name]
        if summary is not None and (name != "tokens" or tokenized):
            lines.append(f"  {label:<23} {_format_summary(summary)}")
    return lines


def _format_summary(summary: Summary) -> str:
    return (
        f"min {summary.min:,.0f}  mean {summary.mean:,.1f}  median {summary.median:,.0f}  "
        f"p95 {summary.p95:,.0f}  max {summary.max:,.0f}"
    )
