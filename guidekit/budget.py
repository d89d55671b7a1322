"""A row budget from the device's free memory and a measured per-row cost.

A forward group of ``rows`` rows is admitted as one call when ``factor x per_row x rows``
is below the device's free memory (ComfyUI admits a batch the same way, with a factor of
1.5); otherwise it is split into calls of at most ``free / (factor x per_row)`` rows.

``per_row`` is measured, once per forward group and shape, on the group's first calls: the
rise of the device's peak memory during the call over what was in use before it, divided by
the rows. A peak that did not rise (an earlier, bigger peak hides the call's own) says
nothing, so the measurement is retried on the next calls (``attempts`` times, then the
group runs without a memory cap). Readers:

* free memory: ``torch.cuda.mem_get_info`` on CUDA; on CPU ``MemAvailable`` from
  ``/proc/meminfo``, else ``psutil.virtual_memory()`` when psutil is installed; ``None``
  (no cap) where neither exists;
* peak memory: ``torch.cuda.max_memory_allocated`` (never reset: the user's own peak
  statistics stay theirs) on CUDA; the process's ``VmHWM`` / ``VmRSS`` from
  ``/proc/self/status`` on CPU.

Both readers are attributes, so tests (and unusual devices) can inject their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from guidekit.errors import GuidanceValueError

#: ``(in use, peak)`` bytes on a device, or ``None`` where they cannot be read.
Usage = tuple[int, int] | None


def _meminfo(field: str, path: str = "/proc/meminfo") -> int | None:
    """A ``kB`` field of a /proc file in bytes, or ``None``."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (``None``: unknown, no cap)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    # /proc/meminfo's MemAvailable first: psutil reports the same figure on Linux, at twice
    # the cost (it parses the whole file); psutil serves the systems without /proc
    available = _meminfo("MemAvailable")
    if available is not None:
        return available
    try:
        import psutil  # optional
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def memory_usage(device: torch.device) -> Usage:
    """``(bytes in use, peak bytes)`` of this process on ``device``."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    rss = _meminfo("VmRSS", "/proc/self/status")
    hwm = _meminfo("VmHWM", "/proc/self/status")
    return None if rss is None or hwm is None else (rss, hwm)


def _factor(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        raise GuidanceValueError(
            f"MemoryBudget({attribute.name}=...) must be a number >= 1, got {value!r}"
        )


@attrs.define
class MemoryBudget:
    """Rows per call from free memory: at most ``free / (factor x per_row)``."""

    factor: float = attrs.field(default=1.5, validator=_factor)
    attempts: int = 3
    free: Callable[[torch.device], int | None] = free_memory
    usage: Callable[[torch.device], Usage] = memory_usage
    #: measured bytes per row, per forward-group key; 0.0: could not be measured
    per_row: dict[Any, float] = attrs.field(factory=dict)
    tries: dict[Any, int] = attrs.field(factory=dict)
    refresh: int = 8
    _caps: dict[Any, tuple[int | None, int]] = attrs.field(factory=dict, repr=False)

    def cap(self, key: Any, device: torch.device) -> int | None:
        """The most rows one call may take now, or ``None`` (no cap known).

        The free memory is read again every ``refresh`` calls of a key (a read of
        /proc/meminfo costs tens of microseconds)."""
        cost = self.per_row.get(key)
        if not cost:
            return None
        cached = self._caps.get(key)
        if cached is not None and cached[1] > 0:
            self._caps[key] = (cached[0], cached[1] - 1)
            return cached[0]
        free = self.free(device)
        cap = None if free is None else max(1, math.floor(free / (self.factor * cost)))
        self._caps[key] = (cap, self.refresh - 1)
        return cap

    def measuring(self, key: Any) -> bool:
        """Whether the next call of ``key`` should be measured."""
        return key not in self.per_row

    @contextmanager
    def measure(self, key: Any, device: torch.device, rows: Callable[[], int]) -> Iterator[None]:
        """Around a group's calls: learn ``per_row`` for ``key`` from the peak's rise over
        what was in use before, divided by ``rows()`` (the rows of its largest call)."""
        before = self.usage(device)
        yield
        after = self.usage(device)
        if before is not None and after is not None and after[1] > before[1]:
            self.per_row[key] = (after[1] - before[0]) / max(1, rows())
            return
        self.tries[key] = self.tries.get(key, 0) + 1
        if before is None or after is None or self.tries[key] >= self.attempts:
            self.per_row[key] = 0.0  # unknown: no cap for this group
