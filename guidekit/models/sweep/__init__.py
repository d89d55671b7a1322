"""``guidekit sweep``: a grid of guidance scales per method or expression on the bundled models.

:mod:`~guidekit.models.sweep.grid` (methods, scales, jobs), :mod:`~.exprs` (expressions
given as text), :mod:`~.family` (what a model family conditions on and scores),
:mod:`~.distributed` (torchrun
sharding), :mod:`~.report` (statistics and files), :mod:`~.speed` (time ratios) and
:mod:`~.run` (the driver, :func:`run_sweep`; its docstring lists the files written).
"""

from guidekit.models.sweep.distributed import Dist, gather, init_distributed
from guidekit.models.sweep.exprs import Expr, check_exprs, method_name, read_exprs
from guidekit.models.sweep.family import DIGITS, FAMILIES, Family, family_of, sweep_models
from guidekit.models.sweep.grid import (
    METHODS,
    Job,
    check_methods,
    expression,
    fmt_scale,
    make_jobs,
    run_job,
    unsupported,
)
from guidekit.models.sweep.report import (
    METRICS,
    markdown_table,
    mean_std,
    panel_title,
    pareto_front,
    pareto_panels,
    pareto_plots,
    read_csv,
    summarize,
    write_csv,
)
from guidekit.models.sweep.run import SweepResult, refuse_unsupported, run_sweep
from guidekit.models.sweep.speed import speed_figures, speed_table

__all__ = [
    "DIGITS", "FAMILIES", "METHODS", "METRICS", "Dist", "Expr", "Family", "Job", "SweepResult",
    "check_exprs", "check_methods", "expression", "family_of", "fmt_scale", "gather",
    "init_distributed", "make_jobs", "markdown_table", "mean_std", "method_name",
    "panel_title", "pareto_front", "pareto_panels", "pareto_plots", "read_csv", "read_exprs",
    "refuse_unsupported", "run_job", "run_sweep", "speed_figures", "speed_table", "summarize",
    "sweep_models", "unsupported", "write_csv",
]
