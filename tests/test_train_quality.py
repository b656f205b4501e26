"""Did a model learn: the verdict against hand-computed figures, and the error the demo stops with."""

import math

import numpy as np
import pytest

from raybackfill.train.quality import (
    ModelDidNotLearnError,
    learning_verdict,
    majority_share,
    require_learned,
)


def test_majority_share_is_the_accuracy_of_guessing_the_largest_class():
    assert majority_share(np.array([3, 3, 3, 1, 2, 2])) == 0.5
    with pytest.raises(ValueError):
        majority_share(np.array([]))


def test_verdict_by_hand():
    # chance 0.1 on 100 rows: se = sqrt(0.1 * 0.9 / 100) = 0.03
    v = learning_verdict(0.25, 0.1, 100)
    assert math.isclose(v.z, 5.0) and math.isclose(v.lift, 0.15 / 0.9)
    assert v.learned
    # 0.18: z = 2.67 < 3, not significant on 100 rows
    assert not learning_verdict(0.18, 0.1, 100).learned
    # 0.15 on 10,000 rows: z = 16.7 but only 5.6 % of the way to perfect
    small = learning_verdict(0.15, 0.1, 10_000)
    assert small.z > 3 and not small.learned
    assert learning_verdict(0.3, 1.0, 5).learned  # one class: nothing to tell


def test_require_learned_names_the_model_and_its_figures():
    training = {"val_accuracy": 0.057, "chance_accuracy": 0.059, "validation_rows": 120, "train_accuracy": 0.061}
    with pytest.raises(ModelDidNotLearnError, match=r"the new model did not learn: validation accuracy 0\.057"):
        require_learned(training, "new")
    verdict = require_learned(training | {"val_accuracy": 0.9}, "new")
    assert verdict.learned
    with pytest.raises(ValueError, match="the old model has no validation figures .*too few images per class"):
        require_learned({"train_accuracy": 1.0}, "old")
