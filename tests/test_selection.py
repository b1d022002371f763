"""Tests for jaxopt_nn._selection: the exact, sort-free choice of the k lowest scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_nn._selection import _counts_below, _layout, _select_lowest

SETTINGS = settings(max_examples=12, deadline=None)

# Few shapes keep compilations few; rows of >= 16 entries take the packed counting
# pass, (7,), (3, 4) and (2, 3) count one threshold at a time, (0, 3) is empty.
SHAPES = [(7,), (3, 4), (2, 3), (0, 3), (40, 30), (17, 16), (1000,)]


def _reference(scores, ks, eligible, scope, highest):
    """NumPy: per group the k lowest (highest) eligible scores, ties by flat index."""
    flats = [np.asarray(s, np.float64).ravel() for s in scores]
    if eligible is None:
        eligible = [np.ones(f.size, bool) for f in flats]
    groups = [[i] for i in range(len(flats))] if scope == "layer" else [list(range(len(flats)))]
    out = [np.zeros(f.size, bool) for f in flats]
    for members, k in zip(groups, ks, strict=True):
        where = [(i, j) for i in members for j in range(flats[i].size)]
        values = np.array([flats[i][j] for i, j in where])
        allowed = np.array([np.asarray(eligible[i]).ravel()[j] for i, j in where], bool)
        order = np.argsort(-values if highest else values, kind="stable")
        for o in [o for o in order if allowed[o]][:k]:
            i, j = where[o]
            out[i][j] = True
    return [o.reshape(np.shape(s)) for o, s in zip(out, scores, strict=True)]


def _scores(rng, shape, kind, dtype):
    if kind == "ties":  # few distinct values: ties straddle the threshold
        x = rng.integers(0, 4, size=shape).astype(np.float32)
    elif kind == "zeros":  # most scores 0, as for already pruned weights
        x = np.abs(rng.standard_normal(shape)) * (rng.random(shape) < 0.2)
    else:
        x = np.abs(rng.standard_normal(shape))
    return jnp.asarray(x, dtype)


@SETTINGS
@given(
    picks=st.lists(st.integers(0, len(SHAPES) - 1), min_size=1, max_size=2),
    kind=st.sampled_from(["normal", "ties", "zeros"]),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    scope=st.sampled_from(["layer", "global"]),
    highest=st.booleans(),
    with_eligible=st.booleans(),
    fractions=st.lists(st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0, 1.5]), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_select_lowest_matches_a_stable_argsort(
    picks, kind, dtype, scope, highest, with_eligible, fractions, seed
):
    rng = np.random.default_rng(seed)
    shapes = [SHAPES[p] for p in picks]
    scores = [_scores(rng, s, kind, dtype) for s in shapes]
    eligible = [rng.random(s) < rng.random() for s in shapes] if with_eligible else None
    sizes = [int(np.prod(s)) for s in shapes]
    group_sizes = sizes if scope == "layer" else [sum(sizes)]
    # k up to 1.5 n: more than the eligible entries prunes all of them.
    ks = [round(f * n) for f, n in zip(fractions, group_sizes, strict=False)]
    got = _select_lowest(
        scores,
        jnp.asarray(ks, jnp.int32),
        None if eligible is None else [jnp.asarray(e) for e in eligible],
        scope=scope,
        highest=highest,
    )
    expected = _reference(scores, ks, eligible, scope, highest)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(g), e)


@pytest.mark.parametrize("highest", [False, True])
def test_select_lowest_breaks_a_tie_of_every_score_by_flat_index(highest):
    scores = [jnp.zeros((40, 30)), jnp.zeros(17)]
    for scope, ks in (("layer", [700, 5]), ("global", [1203])):
        got = _select_lowest(scores, jnp.asarray(ks, jnp.int32), None, scope=scope, highest=highest)
        expected = _reference(scores, ks, None, scope, highest)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(g), e)


def test_select_lowest_counts_are_traced_in_one_compilation():
    scores = [jnp.abs(jax.random.normal(jax.random.key(0), (40, 30)))]
    traces = []

    @jax.jit
    def select(k):
        traces.append(1)
        return _select_lowest(scores, k, None, scope="layer")[0]

    for k in (0, 1, 599, 1200):
        assert int(select(jnp.asarray([k], jnp.int32)).sum()) == k
    assert len(traces) == 1


@pytest.mark.parametrize("size", [0, 1, 7, 32, 255, 256, 1000, 235200, 257 * 3, 2 * 257])
def test_layout_covers_the_size_and_keeps_row_sums_exact(size):
    folds, rows, row = _layout(size)
    assert folds * rows * row == size
    assert 1 <= folds * row <= 255  # each base-256 digit of a row sum
    if folds == 1 and size and size % 2 == 0:  # halves only when their rows reach 16 entries
        assert max(d for d in range(1, 128) if (size // 2) % d == 0) < 16


@pytest.mark.parametrize("shape", [(2, 4, 127), (1, 3, 255), (2, 3, 16), (1, 5, 7), (3, 2, 100)])
def test_counts_below_match_numpy_with_full_rows(shape):
    # Full rows are the worst case for the packed base-256 digits; (3, 2, 100) would
    # overflow a digit (300 > 255) and is counted one threshold at a time.
    values = jnp.asarray(np.random.default_rng(0).integers(0, 6, size=shape), jnp.uint32)
    thresholds = jnp.asarray([1, 5, 6], jnp.uint32)  # the last counts every entry
    got = jax.jit(_counts_below)(values, thresholds)
    expected = [int((np.asarray(values) < t).sum()) for t in (1, 5, 6)]
    np.testing.assert_array_equal(np.asarray(got), expected)
