"""Hypothesis strategies and a plain reference evaluator for guidekit's law tests.

Test modules import every name from here (``from strategies import ...``; tests/conftest.py
puts tests/ on ``sys.path``). Three parts:

* **Values** (:mod:`.values`, :mod:`.expressions`). One strategy per registered class
  (:func:`strategy_for`), DERIVED from its attrs fields: a field draws from the class's
  ``field_examples`` when it names the field, else from its validator's range
  (:data:`BY_VALIDATOR`), else keeps its default; values the term's own validators reject
  are discarded. Recursive expression strategies are built from them: :func:`directions`,
  :func:`predictions`, :func:`piped`. They reuse drawn subtrees (``d + d``,
  ``p + (d - d)``) so that deduplication is exercised.
* **Worlds** (:mod:`.worlds`). :class:`World` fixes the batch, prediction space, noise
  convention, seed and a decreasing list of noise levels. From it, deterministic float64
  branch outputs (:func:`branch_output`) and fake models (:class:`FakeModel`) that answer
  every row with the output of the branch the row belongs to. Rows carry an integer ``tag``
  (0 = cond, 1 = uncond) and ``idx`` (sample index) in the conditioning, checked against
  the plan's documented row layout, which also places perturbed branches (PAG).
* **Reference** (:mod:`.reference`: the terms; :mod:`.evaluate`: post-processors and a
  run). :func:`reference` computes an expression's value directly from the tree, with each
  term's formula from the papers (``methods.md``) written here independently and without
  ``Plan.step``, so "batched evaluation equals evaluating each branch separately" compares
  two different computations.

A new linear or direction term needs nothing here: its strategy comes from its fields and
the reference reads its ``coefficients()`` (its formula is checked by its own oracle test,
see docs/contributing.md). A nonlinear term or a post-processor needs a reference formula
(:data:`TERM_REFERENCE` in :mod:`.reference`, ``_apply`` in :mod:`.evaluate`); a law test
names what is missing.
"""

from __future__ import annotations

from .evaluate import (
    AMBIGUOUS,
    PROCESSOR_REFERENCE,
    Reference,
    assert_close,
    has_reference,
    reference,
)
from .expressions import (
    apg_lefts,
    attach,
    classes_in,
    directions,
    expressions,
    has_uncond,
    piped,
    prediction_atoms,
    predictions,
)
from .reference import (
    TERM_COEFFICIENTS,
    TERM_REFERENCE,
    Env,
    active,
    atom_branches,
    coefficients,
    cond_of,
    contributions,
    dot,
    from_x0,
    needed_branches,
    reference_value,
    structural_branches,
    term_coefficients,
    term_reference,
    to_x0,
    uncond_of,
)
from .values import (
    AUTOGUIDANCE_MODELS,
    BY_VALIDATOR,
    FLOW_SIGMAS,
    GATE_POINTS,
    ROW_SIGMAS,
    SCALES,
    VE_SIGMAS,
    field_strategy,
    gate_bounds,
    numbers,
    processors,
    strategy_for,
    terms,
)
from .worlds import (
    POOLS,
    SHAPE,
    SPACES,
    TAG_NAMES,
    TAGS,
    FakeModel,
    LayoutProbe,
    Run,
    World,
    branch_output,
    conditionings,
    fake_models,
    modified,
    run_plan,
    sample_x,
    worlds,
)

__all__ = [
    "AMBIGUOUS",
    "AUTOGUIDANCE_MODELS",
    "BY_VALIDATOR",
    "Env",
    "FLOW_SIGMAS",
    "FakeModel",
    "GATE_POINTS",
    "LayoutProbe",
    "POOLS",
    "PROCESSOR_REFERENCE",
    "ROW_SIGMAS",
    "Reference",
    "Run",
    "SCALES",
    "SHAPE",
    "SPACES",
    "TAGS",
    "TAG_NAMES",
    "TERM_COEFFICIENTS",
    "TERM_REFERENCE",
    "VE_SIGMAS",
    "World",
    "active",
    "apg_lefts",
    "assert_close",
    "atom_branches",
    "attach",
    "branch_output",
    "classes_in",
    "coefficients",
    "cond_of",
    "conditionings",
    "contributions",
    "directions",
    "dot",
    "expressions",
    "fake_models",
    "field_strategy",
    "from_x0",
    "gate_bounds",
    "has_reference",
    "has_uncond",
    "modified",
    "needed_branches",
    "numbers",
    "piped",
    "prediction_atoms",
    "predictions",
    "processors",
    "reference",
    "reference_value",
    "run_plan",
    "sample_x",
    "strategy_for",
    "structural_branches",
    "term_coefficients",
    "term_reference",
    "terms",
    "to_x0",
    "uncond_of",
    "worlds",
]
