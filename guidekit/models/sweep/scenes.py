"""The scenes models as a sweep family: captions in, prompt adherence and FD out.

A job of ``per_class`` samples per class samples the captions of the first ``10 per_class``
held-out scenes (``data.load(0).test``, never seen in training), so its captions follow the
data's distribution and its FD is taken against all 2000 held-out real scenes. Scores, all
read by the shipped attribute classifier (:mod:`~guidekit.models.scenes.classifier`):

* **accuracy**: per-attribute adherence to the caption, averaged over the attribute heads
  (count, position, each object's shape / colour / size, background);
* **exact**: the share of samples right on every attribute at once;
* **fd**: Fréchet distance between the classifier's 128-d features of the samples and of
  the held-out real scenes (comparable only at equal sample counts);
* **diversity**: mean pairwise feature distance over the job's samples; **diversity_gap**
  its distance to the same figure for the real scenes of those captions.

Autoguidance reads ``scenes-weak`` as ``weak`` (on ``scenes``; ``scenes-fast`` has none).
"""

from __future__ import annotations

import functools
from typing import Any

import attrs
import numpy as np
import torch

from guidekit.errors import GuidanceValueError
from guidekit.models.cache import DIGITS, ModelCache

#: the scenes' class count for the sweep's ``per_class``: ten captions per unit
CAPTIONS_PER_CLASS = DIGITS


@attrs.frozen(eq=False)
class SceneJob:
    """The captions of one job and their held-out scenes' labels and images."""

    captions: tuple[str, ...]
    labels: torch.Tensor
    images: torch.Tensor

    def __len__(self) -> int:
        return len(self.captions)


@functools.lru_cache(maxsize=1)
def _held_out() -> Any:
    from guidekit.models.scenes.data import TEST_SIZE, load

    return load(0, train=1, test=TEST_SIZE).test


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray]:
    from guidekit.models.metrics import feature_stats

    return feature_stats(_features(_held_out().images))


def _classifier() -> Any:
    from guidekit.models.scenes.classifier import shipped_classifier

    return shipped_classifier()


def _features(images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return _classifier().features(images.float()).double().numpy()  # type: ignore[no-any-return]


class Scenes:
    """The bundled text-conditioned scenes models (``scenes``, its few-step sibling
    ``scenes-fast``), scored by the shipped attribute classifier."""

    name: str = "scenes"
    models: tuple[str, ...] = ("scenes", "scenes-fast")
    metrics: tuple[str, ...] = ("accuracy", "exact", "fd", "diversity", "diversity_gap")
    accuracy_label: str = "attribute accuracy (mean over heads)"

    def conditioning(self, per_class: int) -> SceneJob:
        test = _held_out()
        n = CAPTIONS_PER_CLASS * per_class
        if n > len(test):
            raise ValueError(f"scenes: {per_class} samples per class is {n} captions; the "
                             f"held-out set has {len(test)}: use at most "
                             f"{len(test) // CAPTIONS_PER_CLASS}")
        return SceneJob(tuple(test.captions[:n]), test.labels[:n], test.images[:n])

    def sample(self, models: ModelCache, model: str, text: str, conditioning: Any, *,
               steps: int, seed: int) -> Any:
        from guidekit.models.scenes.sample import sample_scenes

        weak = None
        if "Autoguidance" in text:
            if model != "scenes":
                raise GuidanceValueError(f"Autoguidance on model {model!r} reads a weaker "
                                         f"sibling as 'weak' and {model!r} has none: run it "
                                         "on scenes (its weak sibling is scenes-weak)")
            weak = models("scenes-weak")
        captions = conditioning.captions if isinstance(conditioning, SceneJob) else conditioning
        return sample_scenes(models(model), text, list(captions), steps=steps, seed=seed,
                             weak=weak)

    def probe(self, models: ModelCache, model: str, text: str) -> None:
        self.sample(models, model, text, ["", "a small red circle on the left on a black "
                                          "background"], steps=1, seed=0)

    def score(self, images: Any, conditioning: Any) -> dict[str, float]:
        from guidekit.models.metrics import feature_stats, frechet_distance, mean_pairwise_distance
        from guidekit.models.scenes.classifier import adherence

        job: SceneJob = conditioning
        with torch.no_grad():
            right = adherence(_classifier().predict(images.float()), job.labels)
        exact = right.pop("all")
        feats = _features(images)
        mu, cov = feature_stats(feats)
        diversity = mean_pairwise_distance(feats)
        real = mean_pairwise_distance(_features(job.images))
        return {"accuracy": float(np.mean(list(right.values()))), "exact": exact,
                "fd": frechet_distance(mu, cov, *_reference()), "diversity": diversity,
                "diversity_gap": abs(diversity - real)}


SCENES = Scenes()
