"""Scales by noise level: schedule values a term's scale field takes in place of a number.

See :mod:`guidekit.schedule` (the value and its algebra), :mod:`.progress` (the run's
progress ``r``), :mod:`.shapes` (by sigma) and :mod:`.curves` (by progress).
"""

from guidekit.schedule import (
    SCHEDULES,
    Affine,
    Schedule,
    resolve,
    scheduled_fields,
    value_at,
)
from guidekit.schedules.curves import Beta, Cosine, Linear, PowerLaw, beta_pdf
from guidekit.schedules.progress import Level, log_progress, schedule_progress
from guidekit.schedules.shapes import Constant, Piecewise, Window

__all__ = [
    "SCHEDULES", "Affine", "Beta", "Constant", "Cosine", "Level", "Linear", "Piecewise",
    "PowerLaw", "Schedule", "Window", "beta_pdf", "log_progress", "resolve",
    "schedule_progress", "scheduled_fields", "value_at",
]
