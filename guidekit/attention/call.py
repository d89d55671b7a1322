"""One model call under the attention engine, as a context manager.

:meth:`AttentionEngine.around_call <guidekit.attention.engine.AttentionEngine.around_call>`
returns one per model call. It is a plain object, not a generator context manager: it is
entered at every call, and the generator's machinery (and a second one for the attention
modifiers, entered only where the plan has some) was most of the engine's Python cost
outside the hooked layers.
"""

from __future__ import annotations

import contextlib
from typing import Any

from guidekit.plan import RowLayout


class EngineCall:
    """One model call under ``engine``: its lock held, ``layout``'s routes active (and the
    attention modifiers holding the layout, where the plan has modifiers); on exit what was
    active before is put back and the lock released."""

    __slots__ = ("engine", "layout", "previous", "modifiers")

    def __init__(self, engine: Any, layout: RowLayout) -> None:
        self.engine = engine
        self.layout = layout
        self.previous: tuple[Any, Any] = (None, None)
        self.modifiers: contextlib.AbstractContextManager[None] | None = None

    def __enter__(self) -> None:
        engine = self.engine
        engine._lock.acquire()
        self.previous = engine.active_routes()
        try:
            engine.activate(self.layout)
            if engine.modifiers.layers:
                self.modifiers = engine.modifiers.active(self.layout)
                self.modifiers.__enter__()
        except BaseException:
            engine.restore_routes(self.previous)
            engine._lock.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        engine = self.engine
        try:
            if self.modifiers is not None:
                self.modifiers.__exit__(*exc)
        finally:
            engine.restore_routes(self.previous)
            engine._lock.release()
