"""Did a classifier learn? A model whose validation accuracy is near what guessing gives is an error, not a
result: every compatibility figure computed from it afterwards would be noise.

Chance here is the accuracy of always answering the largest class, on the validation rows themselves: on an
imbalanced table that is well above 1 / classes, and a model that learned nothing but the class prior reaches it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A model has learned when its validation accuracy is both significantly above chance (Z_MIN standard errors of
# a classifier that guesses at the chance rate) and above it by a real margin (MIN_LIFT of the way from chance to
# perfect): the first rules out luck on a small validation split, the second a model that learned next to nothing.
Z_MIN = 3.0
MIN_LIFT = 0.1


class ModelDidNotLearnError(ValueError):
    """A trained classifier ended near chance on its validation split; the message names it and its figures."""


def majority_share(labels: np.ndarray) -> float:
    """Share of the most frequent label: the accuracy of always guessing it."""
    labels = np.asarray(labels)
    if not len(labels):
        raise ValueError("no labels")
    return float(np.unique(labels, return_counts=True)[1].max() / len(labels))


@dataclass(frozen=True)
class LearningVerdict:
    """``learned`` and the figures it was decided on."""

    learned: bool
    val_accuracy: float
    chance_accuracy: float
    validation_rows: int
    z: float
    lift: float

    def describe(self) -> str:
        return (
            f"validation accuracy {self.val_accuracy:.3f} on {self.validation_rows} held-out rows against "
            f"{self.chance_accuracy:.3f} for always guessing the largest class "
            f"(z {self.z:.1f}, needs {Z_MIN:g}; {self.lift:.0%} of the way to perfect, needs {MIN_LIFT:.0%})"
        )


def learning_verdict(val_accuracy: float, chance_accuracy: float, validation_rows: int) -> LearningVerdict:
    """Whether ``val_accuracy`` on ``validation_rows`` rows is far enough above ``chance_accuracy``."""
    if validation_rows < 1:
        raise ValueError("validation_rows must be positive")
    if chance_accuracy >= 1.0:  # one class: nothing to learn, nothing to tell
        return LearningVerdict(True, val_accuracy, chance_accuracy, validation_rows, math.inf, 0.0)
    se = math.sqrt(chance_accuracy * (1.0 - chance_accuracy) / validation_rows)
    z = (val_accuracy - chance_accuracy) / se
    lift = (val_accuracy - chance_accuracy) / (1.0 - chance_accuracy)
    return LearningVerdict(z >= Z_MIN and lift >= MIN_LIFT, val_accuracy, chance_accuracy, validation_rows, z, lift)


def require_learned(training: dict, name: str) -> LearningVerdict:
    """Raise :class:`ModelDidNotLearnError` unless the run recorded in ``training`` (``ModelSpec.training`` of a
    classifier trained with a validation split) learned. Returns the verdict."""
    missing = [k for k in ("val_accuracy", "chance_accuracy", "validation_rows") if k not in training]
    if missing:
        raise ValueError(
            f"the {name} model has no validation figures ({', '.join(missing)}): its run held no rows out "
            "(validation_fraction 0, or too few images per class to hold any out), so whether it learned is unknown"
        )
    verdict = learning_verdict(training["val_accuracy"], training["chance_accuracy"], int(training["validation_rows"]))
    if not verdict.learned:
        train_accuracy = training.get("train_accuracy")
        seen = f"; training accuracy {train_accuracy:.3f}" if train_accuracy is not None else ""
        raise ModelDidNotLearnError(
            f"the {name} model did not learn: {verdict.describe()}{seen}. Its embeddings would make every "
            "figure after it noise. Check that labels match images, that there are enough images per class, "
            "and the epochs / learning rate."
        )
    return verdict
