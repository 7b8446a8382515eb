"""The paper's depth study (Fig. 4 and Fig. 6) in one bundle command.

For every (depth N, training-set size k) cell and every entry of ``seeds``, the bundle's own
training runs in a subprocess and the exported model is evaluated on held-out test subjects
with the project's metrics; the study writes ``metrics.csv``, ``summary.md`` (the Fig. 4 table
and the paired comparison of each depth against the ESPCN of the same training-set size),
``rmse_vs_depth.png`` and ``memory_time_vs_depth.png`` (Fig. 6). :mod:`.plan` splits the
subjects and checks the settings, :mod:`.cell` trains and evaluates one cell, :mod:`.report`
writes the tables and :mod:`.run` runs the study: :func:`run_study` for Python callers and
:func:`bundle_study`, the ``run`` entry of ``configs/study.json``.
"""

from monai_iqt.study.run import bundle_study, run_study

__all__ = ["bundle_study", "run_study"]
