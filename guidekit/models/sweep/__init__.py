"""``guidekit sweep``: a grid of guidance scales per method on the bundled digit models.

:mod:`~guidekit.models.sweep.grid` (methods, scales, jobs), :mod:`~.distributed` (torchrun
sharding), :mod:`~.report` (statistics and files), :mod:`~.speed` (time ratios) and
:mod:`~.run` (the driver, :func:`run_sweep`; its docstring lists the files written).
"""

from guidekit.models.sweep.distributed import Dist, gather, init_distributed
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
    pareto_front,
    pareto_plots,
    read_csv,
    summarize,
    write_csv,
)
from guidekit.models.sweep.run import SweepResult, run_sweep
from guidekit.models.sweep.speed import speed_figures, speed_table

__all__ = [
    "METHODS", "METRICS", "Dist", "Job", "SweepResult", "check_methods", "expression",
    "fmt_scale", "gather", "init_distributed", "make_jobs", "markdown_table", "mean_std",
    "pareto_front", "pareto_plots", "read_csv", "run_job", "run_sweep", "speed_figures",
    "speed_table", "summarize", "unsupported", "write_csv",
]
