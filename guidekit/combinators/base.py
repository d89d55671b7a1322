"""Post-processors (right of ``|``) and input modifiers: the non-additive part of the algebra.

The base classes live in :mod:`guidekit.processor`, next to the pipe they stand in, so that
the layers below the combinators (compile, the plan) read them without importing every
combinator; they are importable from here as before.
"""

from guidekit.processor import AttentionModifier, InputModifier, Processor

__all__ = ["AttentionModifier", "InputModifier", "Processor"]
