"""The tables and the paired test that evaluation and the depth study both write.

One paired comparison of two models' RMSE for both: pairs are whatever both models were scored
on alike, test subjects (evaluation) or (test subject, seed) pairs (the depth study). A claim
gives n, the median relative change, the Wilcoxon signed-rank statistic and its two-sided p
(``scipy.stats.wilcoxon``, exact for small n), and says so when n is too small for the test to
reach p < 0.05: with n non-zero differences the smallest two-sided p the exact test can give is
2 / 2^n (0.0625 for n = 5), so there a p would only look like evidence. Beside it, the
formatting both tables share: mean ± sd of a column, a markdown table, a CSV file.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from preprocessing.io import write_text

#: The significance level whose reachability is checked.
ALPHA = 0.05


def smallest_p(n: int) -> float:
    """The smallest two-sided p of the exact signed-rank test with ``n`` non-zero differences."""
    return min(1.0, 2.0 / 2.0**n)


@dataclass(frozen=True)
class PairedComparison:
    """``first`` against ``second`` over their common pairs (relative change: first vs second)."""

    first: str
    second: str
    region: str
    n: int
    median_relative_change: float | None
    first_better_in: int
    statistic: float | None
    p_value: float | None
    note: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def p_text(self) -> str:
        """The p-value, or why there is none."""
        return f"{self.p_value:.4g}" if self.p_value is not None else self.note


def paired_comparison(
    first: Mapping[Hashable, float],
    second: Mapping[Hashable, float],
    first_name: str = "first",
    second_name: str = "second",
    region: str = "total",
) -> PairedComparison:
    """Compare two models' RMSE keyed by pair (subject, or (subject, seed)).

    Only keys present in both count. The statistic is computed whenever two or more pairs
    differ; the p-value only when ``n`` non-zero differences can reach p < ``ALPHA``.
    """
    keys = [key for key in first if key in second]
    a = np.array([first[key] for key in keys], dtype=float)
    b = np.array([second[key] for key in keys], dtype=float)
    n = len(keys)
    change = float(np.median((a - b) / b)) if n else None
    wins = int(np.sum(a < b))
    fields = dict(
        first=first_name, second=second_name, region=region, n=n, median_relative_change=change
    )
    nonzero = int(np.count_nonzero(a - b))
    if nonzero < 2:
        note = f"n = {n} pairs, {nonzero} of them differing: no test"
        return PairedComparison(
            **fields, first_better_in=wins, statistic=None, p_value=None, note=note
        )
    test = scipy_stats.wilcoxon(a, b)
    if smallest_p(nonzero) >= ALPHA:
        note = (
            f"no p: n = {nonzero} is too small, the smallest two-sided p is "
            f"{smallest_p(nonzero):.3g} ≥ {ALPHA}"
        )
        p_value = None
    else:
        note = f"{first_name} has the lower {region} RMSE in {wins} of {n} pairs"
        p_value = float(test.pvalue)
    return PairedComparison(
        **fields,
        first_better_in=wins,
        statistic=float(test.statistic),
        p_value=p_value,
        note=note,
    )


def paired_wilcoxon(
    rows: Sequence[Mapping[str, Any]],
    first: str | Mapping[str, Any],
    second: str | Mapping[str, Any],
    region: str = "total",
) -> PairedComparison:
    """The paired comparison (:func:`paired_comparison`) of two models' rows of RMSE.

    ``first`` and ``second`` are a model name or the values a row must match (e.g. model,
    depth and TVS of a study cell); rows are paired by (subject, seed), a row without a seed
    (evaluation's) by its subject alone.
    """

    def by_pair(match: Mapping[str, Any]) -> dict[tuple[str, Any], float]:
        return {(r["subject"], r.get("seed", "")): r[region] for r in matching(rows, match)}

    matches = [{"model": m} if isinstance(m, str) else m for m in (first, second)]
    names = [str(m.get("model", m)) for m in matches]
    return paired_comparison(by_pair(matches[0]), by_pair(matches[1]), *names, region=region)


def paired_sentence(c: Mapping[str, Any]) -> str:
    """A paired comparison ``c`` (:meth:`PairedComparison.as_dict`; empty: none made) in one
    sentence, as evaluation's ``summary.md`` gives it."""
    if not c:
        return "Wilcoxon signed-rank test: not computed (fewer than two methods)."
    if c.get("statistic") is None:
        test = f"Wilcoxon signed-rank test ({c['first']} vs {c['second']}, {c['region']} RMSE): "
        return test + f"not computed ({c['note']}; n = {c['n']})."
    p = f"p = {c['p_value']:.4g}" if c["p_value"] is not None else "p not given"
    return (
        f"Wilcoxon signed-rank test ({c['first']} vs {c['second']}, paired {c['region']} RMSE, "
        f"n = {c['n']}): median relative change {100 * c['median_relative_change']:+.1f} %, "
        f"W = {c['statistic']:g}, {p}; {c['note']}."
    )


def matching(rows: Sequence[Mapping[str, Any]], match: Mapping[str, Any]) -> list[Mapping]:
    """The rows whose values equal every value of ``match``."""
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def mean_sd(
    values: Sequence[float | None],
    digits: int = 2,
    bracketed: bool = True,
    skip_missing: bool = True,
) -> str:
    """Mean ± sample standard deviation with ``digits`` decimals; one value: that value.

    Evaluation's tables write ``mean (± sd)`` over the values present ("n/a" if none is);
    the study's writes ``mean ± sd`` (``bracketed`` false) over every value as it is
    (``skip_missing`` false), a NaN included.
    """
    if skip_missing:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if not values:
            return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean, sd = f"{np.mean(values):.{digits}f}", f"{np.std(values, ddof=1):.{digits}f}"
    return f"{mean} (± {sd})" if bracketed else f"{mean} ± {sd}"


def markdown_table(headings: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines: headings, the separator, then a line per row of cells."""
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def model_table(
    rows: Sequence[Mapping[str, Any]],
    models: Sequence[str],
    headings: Sequence[str],
    cells: Callable[[list[Mapping[str, Any]]], list[str]],
) -> str:
    """A markdown table with a line per model: its name, then ``cells(its rows)``."""
    lines = [[model, *cells([r for r in rows if r["model"] == model])] for model in models]
    return "\n".join(markdown_table(headings, lines))


def write_csv(
    path: Path,
    columns: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    lineterminator: str = "\r\n",
) -> Path:
    """``rows`` as a CSV file with a header (None as an empty field), written atomically; the
    study's ``metrics.csv`` ends its lines with ``\\n``, evaluation's with the csv module's
    default ``\\r\\n``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator=lineterminator)
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())
