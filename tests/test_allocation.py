"""Tests for the accuracy-budget search helpers: validation split, byte estimate, allocation."""

import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_nn import allocation, train
from jaxopt_nn.data import Dataset, load_digits
from jaxopt_nn.models import LeNet300100


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_validation_split_is_stratified_seeded_disjoint_and_ignores_the_test_split(digits):
    part = allocation.split_validation(digits, 0.1, seed=3)
    assert len(part.y_train) + len(part.y_test) == len(digits.y_train)
    # Disjoint, and together exactly the training set (rows compared as bytes).
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}  # noqa: E731
    assert rows(part.x_train).isdisjoint(rows(part.x_test))
    assert rows(part.x_train) | rows(part.x_test) == rows(digits.x_train)
    # Stratified: each class gives round(10%) of its examples.
    for label in range(10):
        count = int(np.sum(digits.y_train == label))
        assert int(np.sum(part.y_test == label)) == round(0.1 * count)
    again = allocation.split_validation(digits, 0.1, seed=3)
    np.testing.assert_array_equal(again.y_test, part.y_test)
    np.testing.assert_array_equal(again.x_test, part.x_test)
    other = allocation.split_validation(digits, 0.1, seed=4)
    assert not np.array_equal(other.x_test, part.x_test)
    # The test split plays no part: garbage there gives the same split.
    garbage = digits._replace(x_test=np.full_like(digits.x_test, np.nan))
    np.testing.assert_array_equal(
        allocation.split_validation(garbage, 0.1, seed=3).x_test, part.x_test
    )
    assert part.classes == 10


def test_validation_folds_are_disjoint_stratified_blocks_of_one_draw(digits):
    first = allocation.split_validation(digits, 0.1, seed=3)
    np.testing.assert_array_equal(
        allocation.split_validation(digits, 0.1, seed=3, fold=0).y_test, first.y_test
    )
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}  # noqa: E731
    folds = [allocation.split_validation(digits, 0.1, seed=3, fold=k) for k in range(3)]
    for k, part in enumerate(folds):
        assert len(part.y_train) + len(part.y_test) == len(digits.y_train)
        assert rows(part.x_train) | rows(part.x_test) == rows(digits.x_train)
        for label in range(10):
            count = int(np.sum(digits.y_train == label))
            assert int(np.sum(part.y_test == label)) == round(0.1 * count)
        for other in folds[:k]:
            assert rows(part.x_test).isdisjoint(rows(other.x_test))


@pytest.mark.parametrize("fold", [9, 100])
def test_a_fold_past_the_last_block_is_refused(digits, fold):
    # Ten blocks of 10% would leave no training example of a class.
    with pytest.raises(ValueError, match=rf"fold={fold} of validation=0.1 .* allowed: fold < "):
        allocation.split_validation(digits, 0.1, fold=fold)


@pytest.mark.parametrize("fold", [-1, 1.0, True, "1"])
def test_a_fold_that_is_not_a_nonnegative_integer_is_refused(digits, fold):
    with pytest.raises(ValueError, match=r"fold must be an integer >= 0; got fold="):
        allocation.split_validation(digits, 0.1, fold=fold)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, True, "0.1"])
def test_validation_fraction_out_of_range_is_refused(digits, fraction):
    with pytest.raises(ValueError, match=r"validation must be a number in \(0, 1\)"):
        allocation.split_validation(digits, fraction)


def test_a_split_that_leaves_no_validation_example_is_refused():
    tiny = Dataset(
        np.zeros((3, 1, 1, 1), np.float32), np.arange(3), np.zeros((0, 1, 1, 1)), np.zeros(0)
    )
    with pytest.raises(ValueError, match="both must be > 0"):
        allocation.split_validation(tiny, 0.1)


def test_estimated_bytes_fall_with_sparsity_and_rise_with_bits():
    sizes = [allocation.estimate_bytes(30000, s, 4) for s in allocation.SPARSITIES]
    assert np.all(np.diff(sizes) < 0)
    widths = [allocation.estimate_bytes(30000, 0.95, b) for b in allocation.BITS]
    assert np.all(np.diff(widths) > 0)


def test_sensitivity_grows_with_sparsity_and_allocations_trade_bytes_for_loss(digits):
    model = LeNet300100(64, hidden=(32, 16), rngs=nnx.Rngs(0))
    part = allocation.split_validation(digits, 0.2)
    result = train.fit(model, optax.adam(3e-3), part, epochs=5, progress=False)
    names = ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
    sens = allocation.layer_sensitivity(
        result.graphdef, result.state, part, names, sparsities=(0.5, 0.99), bits=(3, 6)
    )
    assert [s.name for s in sens] == names
    for s in sens:
        assert s.delta[(0.99, 6)] > s.delta[(0.5, 6)]
    family = allocation.allocations(sens)
    estimates = [a.estimated_bytes for a in family]
    assert estimates == sorted(estimates) and len(family) >= 2
    # Larger multipliers weigh the loss more: the largest allocation is the least lossy.
    loss = lambda a: sum(max(0.0, s.delta[(a.sparsity[s.name], a.bits[s.name])]) for s in sens)  # noqa: E731
    assert loss(family[-1]) <= loss(family[0])
