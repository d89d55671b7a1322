"""A model family as the sweep sees it: which models, what a job conditions on, how it scores.

The sweep's grid, driver and report never name digits: a job asks its model's family for
the conditioning of ``per_class`` samples per class, samples through the family and scores
through it. A family scores at least ``accuracy`` (the share of samples that show what was
asked for) and ``fd`` (Fréchet distance to real data): the Pareto plots put those two
against each other. The digit models are :data:`DIGITS`, the text-conditioned scenes models
:data:`~guidekit.models.sweep.scenes.SCENES`; another family joins by adding itself to
:data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any, Protocol

from guidekit.errors import GuidanceValueError
from guidekit.models.bundled import MODEL_NAMES
from guidekit.models.cache import ModelCache, digit_labels, weak_name
from guidekit.models.sweep.scenes import SCENES


class Family(Protocol):
    """What the sweep needs from a model family."""

    #: the family's name (reported in errors)
    name: str
    #: the model names the sweep may run from this family
    models: tuple[str, ...]
    #: the score names :meth:`score` returns, in CSV column order
    metrics: tuple[str, ...]
    #: what ``accuracy`` measures, for the Pareto plots' axis
    accuracy_label: str

    def conditioning(self, per_class: int) -> Any:
        """What one job samples: ``per_class`` samples of every class of the family."""
        ...

    def sample(self, models: ModelCache, model: str, text: str, conditioning: Any, *,
               steps: int, seed: int) -> Any:
        """Sample ``model`` under guidance ``text``; a :class:`~guidekit.models.SampleResult`
        (``images``, ``calls``, ``seconds``). Raises GuidanceError if it cannot run ``text``."""
        ...

    def probe(self, models: ModelCache, model: str, text: str) -> None:
        """One cheap step of ``text`` on ``model``: raises GuidanceError if it cannot run it."""
        ...

    def score(self, images: Any, conditioning: Any) -> dict[str, float]:
        """The scores of one job's samples, keyed by :attr:`metrics`."""
        ...


class Digits:
    """The bundled 8x8 digit models: labels 0..9, scored by the shipped digit classifier.

    Autoguidance reads the model's weaker sibling (``<model>-weak``) as ``weak``.
    """

    name: str = "digits"
    models: tuple[str, ...] = MODEL_NAMES
    metrics: tuple[str, ...] = ("accuracy", "fd", "diversity", "diversity_gap")
    accuracy_label: str = "class accuracy"

    def conditioning(self, per_class: int) -> Any:
        return digit_labels(per_class)

    def sample(self, models: ModelCache, model: str, text: str, conditioning: Any, *,
               steps: int, seed: int) -> Any:
        from guidekit.models import sample

        weak = None
        if "Autoguidance" in text:
            if weak_name(model) not in self.models:
                raise GuidanceValueError(f"Autoguidance on model {model!r} reads a weaker "
                                         f"sibling as 'weak' and {model!r} has none: run it on "
                                         "eps or flow")
            weak = models(weak_name(model))
        return sample(models(model), text, conditioning, steps=steps, seed=seed, weak=weak)

    def probe(self, models: ModelCache, model: str, text: str) -> None:
        self.sample(models, model, text, [0, 1], steps=1, seed=0)

    def score(self, images: Any, conditioning: Any) -> dict[str, float]:
        from guidekit.models import evaluate

        m = evaluate(images, conditioning)
        return {"accuracy": m.accuracy, "fd": m.fd, "diversity": m.diversity,
                "diversity_gap": m.diversity_gap}


DIGITS = Digits()

#: every family the sweep can run; a model name belongs to exactly one
FAMILIES: tuple[Family, ...] = (DIGITS, SCENES)


def sweep_models() -> tuple[str, ...]:
    """Every model name the sweep accepts, family by family."""
    return tuple(m for f in FAMILIES for m in f.models)


def family_of(model: str) -> Family:
    """The family ``model`` belongs to; ``ValueError`` naming the known models if none."""
    for family in FAMILIES:
        if model in family.models:
            return family
    raise ValueError(f"unknown model {model!r} for the sweep: choose from "
                     f"{', '.join(sweep_models())}")
