"""Continual-tuning metrics on hand-made matrices, per-example transfer, and the driver on a stand-in learner."""

import json

import numpy as np
import pytest
from torch import nn

from spectral_peft.evaluation.continual import (
    ContinualResult, backward_transfer, example_transfer, final_average_accuracy, forgetting, plot_accuracy_matrix,
    run_continual,
)

R = [[0.9, 0.1, 0.2],
     [0.7, 0.8, 0.1],
     [0.5, 0.6, 0.9]]


def test_metrics_on_a_hand_made_matrix():
    assert final_average_accuracy(R) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert forgetting(R) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    no_forgetting = np.tril(np.ones((3, 3)))  # each task learned fully and kept
    assert backward_transfer(no_forgetting) == 0 and forgetting(no_forgetting) == 0
    improving = [[0.5, 0.0], [0.7, 0.9]]  # positive backward transfer; forgetting is negative
    assert backward_transfer(improving) == pytest.approx(0.2) and forgetting(improving) == pytest.approx(-0.2)


@pytest.mark.parametrize("bad", [[[1.0]], [[0.1, 0.2]], [[0.1, 0.2], [0.3, float("nan")]]])
def test_bad_matrices_raise(bad):
    with pytest.raises(ValueError):
        backward_transfer(bad)


class Learner(nn.Module):
    """Knows a task fully once trained on it, and loses 0.25 of every older task with each later stage; answers
    ``n_examples`` examples per task, all with its current skill."""

    def __init__(self):
        super().__init__()
        self.skill: dict[str, float] = {}


def train_stage(model, task):
    model.skill = {t: s - 0.25 for t, s in model.skill.items()}
    model.skill[task] = 1.0
    return model


def evaluate(model, task, n_examples=2):
    return [model.skill.get(task, 0.0)] * n_examples


def test_driver_fills_the_matrix_in_order():
    result = run_continual(Learner(), ["a", "b", "c"], train_stage, evaluate)
    assert result.R == [[1.0, 0.0, 0.0], [0.75, 1.0, 0.0], [0.5, 0.75, 1.0]]
    assert np.asarray(result.outcomes).shape == (3, 3, 2)
    assert result.backward_transfer == pytest.approx(-0.375) and result.forgetting == pytest.approx(0.375)
    assert result.final_average_accuracy == pytest.approx(0.75)
    assert json.loads(json.dumps(result.to_dict()))["backward_transfer"] == pytest.approx(-0.375)
    fig = plot_accuracy_matrix(result.tasks, result.R)
    assert fig.axes[0].get_images()[0].get_array().shape == (3, 3)
    with pytest.raises(ValueError, match="distinct"):
        run_continual(Learner(), ["a", "a"], train_stage, evaluate)
    with pytest.raises(ValueError, match="no outcomes"):
        run_continual(Learner(), ["a", "b"], train_stage, lambda m, t: [])
    assert isinstance(ContinualResult(["x", "y"], [[[1], [0]], [[1], [1]]]).forgetting, float)


def test_example_transfer_averages_to_the_matrix_metrics():
    rng = np.random.default_rng(0)
    O = (rng.random((2, 3, 3, 5)) < 0.6).astype(float)  # [seeds, stage, task, example]
    acc, bwt = example_transfer(O)
    assert acc.shape == bwt.shape == (2, 5)
    for s in range(2):
        R = O[s].mean(axis=2)
        assert acc[s].mean() == pytest.approx(final_average_accuracy(R))
        assert bwt[s].mean() == pytest.approx(backward_transfer(R))
        e = 3  # one example by hand: BWT_e = mean_{j < 2} (O[2, j, e] - O[j, j, e])
        assert bwt[s, e] == pytest.approx(((O[s, 2, 0, e] - O[s, 0, 0, e]) + (O[s, 2, 1, e] - O[s, 1, 1, e])) / 2)
    with pytest.raises(ValueError, match="as many stages as tasks"):
        example_transfer(np.zeros((2, 3, 4)))
