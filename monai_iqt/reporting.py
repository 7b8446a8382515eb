"""The paired comparison of two models' RMSE: the one test evaluation and the study both quote.

Pairs are whatever both models were scored on alike: test subjects (evaluation) or (test
subject, seed) pairs (the depth study). A claim gives n, the median relative change, the
Wilcoxon signed-rank statistic and its two-sided p (``scipy.stats.wilcoxon``, exact for small n),
and says so when n is too small for the test to reach p < 0.05: with n non-zero differences
the smallest two-sided p the exact test can give is 2 / 2^n (0.0625 for n = 5), so there a p
would only look like evidence.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

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
