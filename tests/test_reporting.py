"""The paired comparison and the table writers evaluation and the depth study share
(:mod:`monai_iqt.reporting`): exact signed-rank p-values, pairs by (subject, seed), no p where
n cannot reach 0.05, and each caller's number format and line endings."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from monai_iqt.reporting import (
    markdown_table,
    mean_sd,
    paired_comparison,
    paired_sentence,
    paired_wilcoxon,
    smallest_p,
    write_csv,
)


def test_wilcoxon_p_value_is_the_exact_signed_rank_probability() -> None:
    # 8 subjects where the model always wins: W = 0, exact two-sided p = 2 / 2^8.
    rows = []
    for index in range(8):
        rows.append({"subject": f"s{index}", "model": "A", "total": 5.0 + 0.1 * index})
        rows.append({"subject": f"s{index}", "model": "B", "total": 6.0 + 0.3 * index})
    result = paired_wilcoxon(rows, {"model": "A"}, {"model": "B"})
    assert result.p_value == pytest.approx(2 / 256) and result.statistic == 0 and result.n == 8
    changes = [(5.0 + 0.1 * i - 6.0 - 0.3 * i) / (6.0 + 0.3 * i) for i in range(8)]
    assert result.median_relative_change == pytest.approx(statistics.median(changes))
    assert result.first_better_in == 8
    one_pair = paired_wilcoxon(rows[:2], {"model": "A"}, {"model": "B"})
    assert one_pair.statistic is None and one_pair.p_value is None and one_pair.n == 1


def test_pairs_are_subject_and_seed() -> None:
    # 3 subjects x 2 seeds: 6 pairs, one pair differing in sign; W = rank of the smallest |d|.
    rows, differences = [], []
    for seed in (0, 1):
        for index in range(3):
            espcn = 6.0 + index + seed
            change = -0.5 - 0.1 * index - 0.05 * seed if (index, seed) != (0, 0) else 0.05
            differences.append(change)
            for model, total in (("ESPCN", espcn), ("ESPCN-RN2", espcn + change)):
                rows.append({"subject": f"s{index}", "seed": seed, "model": model, "total": total})
    result = paired_wilcoxon(rows, {"model": "ESPCN-RN2"}, {"model": "ESPCN"})
    assert result.n == 6 and result.statistic == 1.0  # the one positive difference ranks 1st
    assert result.p_value == pytest.approx(4 / 64)  # exact: P(W <= 1) two-sided = 2 * 2 / 2^6


def test_no_p_where_it_cannot_reach_0_05() -> None:
    assert smallest_p(5) == pytest.approx(0.0625) and smallest_p(6) == pytest.approx(0.03125)
    a = {k: 1.0 + 0.1 * k for k in range(5)}
    b = {k: 2.0 + 0.1 * k for k in range(5)}
    result = paired_comparison(a, b, "A", "B")
    assert result.n == 5 and result.statistic == 0.0 and result.p_value is None
    assert "n = 5 is too small" in result.p_text()
    six = paired_comparison({**a, 5: 1.5}, {**b, 5: 2.5}, "A", "B")
    assert six.p_value == pytest.approx(2 / 64) and six.p_text() == "0.03125"


def test_a_model_name_pairs_rows_by_subject_as_evaluation_does() -> None:
    # evaluation's rows have no seed: a model name pairs them by subject alone
    rows = []
    for index, (a, b) in enumerate(((4.8, 10.0), (5.2, 10.0), (6.0, 9.0))):
        rows.append({"subject": f"s{index}", "model": "ESPCN", "total": a})
        rows.append({"subject": f"s{index}", "model": "cubic B-spline", "total": b})
    by_name = paired_wilcoxon(rows, "ESPCN", "cubic B-spline")
    by_match = paired_wilcoxon(rows, {"model": "ESPCN"}, {"model": "cubic B-spline"})
    by_subject = paired_comparison(
        {r["subject"]: r["total"] for r in rows if r["model"] == "ESPCN"},
        {r["subject"]: r["total"] for r in rows if r["model"] == "cubic B-spline"},
        "ESPCN",
        "cubic B-spline",
    )
    assert by_name == by_match == by_subject
    assert paired_wilcoxon(rows, "ESPCN", "nobody").n == 0


def test_paired_sentence_reads_as_the_evaluation_summary_gives_it() -> None:
    a = {"s0": 4.8, "s1": 4.8}
    b = {"s0": 10.0, "s1": 10.0}
    sentence = paired_sentence(paired_comparison(a, b, "ESPCN", "cubic B-spline").as_dict())
    assert sentence == (
        "Wilcoxon signed-rank test (ESPCN vs cubic B-spline, paired total RMSE, n = 2): median "
        "relative change -52.0 %, W = 0, p not given; no p: n = 2 is too small, the smallest "
        "two-sided p is 0.5 ≥ 0.05."
    )
    untested = paired_comparison({"s0": 1.0}, {"s0": 2.0}, "A", "B").as_dict()
    assert paired_sentence(untested) == (
        "Wilcoxon signed-rank test (A vs B, total RMSE): not computed (n = 1 pairs, 1 of them "
        "differing: no test; n = 1)."
    )
    assert paired_sentence({}) == (
        "Wilcoxon signed-rank test: not computed (fewer than two methods)."
    )


def test_mean_sd_keeps_each_callers_format() -> None:
    sd = statistics.stdev([1.0, 2.0])
    # evaluation: bracketed, missing values left out, n/a when none is left
    assert mean_sd([1.0, 2.0]) == f"1.50 (± {sd:.2f})"
    assert mean_sd([1.0, None, math.nan]) == "1.00"
    assert mean_sd([None, math.nan]) == "n/a"
    assert mean_sd([0.5, 0.25], digits=3) == f"0.375 (± {statistics.stdev([0.5, 0.25]):.3f})"
    # the study: every value as it is
    assert mean_sd([1.0, 2.0], bracketed=False, skip_missing=False) == f"1.50 ± {sd:.2f}"
    assert mean_sd([1.0, math.nan], bracketed=False, skip_missing=False) == "nan ± nan"
    assert mean_sd([3.0], bracketed=False, skip_missing=False) == "3.00"


def test_markdown_table_and_csv(tmp_path: Path) -> None:
    assert markdown_table(("A", "B"), [["1", "2"], ["3", "4"]]) == [
        "| A | B |",
        "|---|---|",
        "| 1 | 2 |",
        "| 3 | 4 |",
    ]
    rows = [{"a": 1.5, "b": None}, {"a": "x", "b": 2}]
    write_csv(tmp_path / "crlf.csv", ("a", "b"), rows)
    assert (tmp_path / "crlf.csv").read_bytes() == b"a,b\r\n1.5,\r\nx,2\r\n"
    write_csv(tmp_path / "lf.csv", ("a", "b"), rows, lineterminator="\n")
    assert (tmp_path / "lf.csv").read_bytes() == b"a,b\n1.5,\nx,2\n"
