"""Bundled diffusion models for demos and benchmarks: small DiTs trained on 8x8 digits.

``load("eps" | "flow" | "eps-weak" | "flow-weak")`` gives a :class:`Bundled` model,
``sample(bundled, expr, labels)`` samples it with a guidance expression, and
``metrics.evaluate(images, labels)`` scores the result (class accuracy, Fréchet distance,
diversity) with the shipped classifier and reference statistics. See docs/models.md.
Importing this package is cheap; diffusers is imported when a model is built or loaded.
"""

from guidekit.models.bundled import MODEL_NAMES, Bundled, load
from guidekit.models.classifier import Classifier, load_classifier
from guidekit.models.metrics import Metrics, evaluate
from guidekit.models.sampling import SampleResult, sample

__all__ = [
    "MODEL_NAMES", "Bundled", "Classifier", "Metrics", "SampleResult", "evaluate", "load",
    "load_classifier", "sample",
]
