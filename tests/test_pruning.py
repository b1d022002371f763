"""Tests for jaxopt_nn.pruning: masks, schedules, the prune transform, export."""

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import sparse as jsparse

from jaxopt_nn import _blockwise, pruning

SETTINGS = settings(max_examples=15, deadline=None)
SCRIPTS = Path(__file__).parent / "parallel_scripts"


def _round_f32(s, size):
    """``round(s * size)`` as the transform forms it for a traced float32 ``s``."""
    return int(np.round(np.float32(s) * np.float32(size)))


def _jitted_value(sched, t):
    """The schedule's value as the jitted transform computes it (ulps may differ eagerly)."""
    return jax.jit(sched)(t)


def _reference_pruned(scores, k):
    """NumPy reference: the ``k`` lowest scores, ties by flat index (stable sort)."""
    flat = np.asarray(scores).ravel()
    pruned = np.zeros(flat.size, bool)
    pruned[np.argsort(flat, kind="stable")[:k]] = True
    return pruned.reshape(np.shape(scores))


def _weights(draw_shape, seed, ties):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct magnitudes and both signs: many exact ties
        return rng.integers(-3, 4, size=draw_shape).astype(np.float32)
    return rng.standard_normal(draw_shape).astype(np.float32)


# A fixed pool of shapes keeps the number of compilations (and the runtime) small.
shapes = st.sampled_from([(1, 1), (1, 7), (3, 4), (6, 5), (2, 3, 4), (4, 1, 3)])


# ------------------------------------------------------------------- masks


@SETTINGS
@given(shape=shapes, sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 99), ties=st.booleans())
def test_magnitude_layer_masks_prune_exactly_the_k_smallest_with_index_tie_break(
    shape, sparsity, seed, ties
):
    w = _weights(shape, seed, ties)
    params = {"w": jnp.asarray(w), "b": jnp.ones(3)}
    masks = pruning.magnitude_masks(params, sparsity)
    k = round(sparsity * w.size)
    assert masks["b"] is None
    np.testing.assert_array_equal(~np.asarray(masks["w"]), _reference_pruned(np.abs(w), k))
    # Traced sparsity (as inside the transform): same selection, float32 rounding.
    traced = jax.jit(lambda p, s: pruning.magnitude_masks(p, s))(params, np.float32(sparsity))
    np.testing.assert_array_equal(
        ~np.asarray(traced["w"]), _reference_pruned(np.abs(w), _round_f32(sparsity, w.size))
    )


@SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=3),
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 99),
    ties=st.booleans(),
)
def test_magnitude_global_masks_rank_all_leaves_together(shape_list, sparsity, seed, ties):
    params = {f"l{i}": jnp.asarray(_weights(s, seed + i, ties)) for i, s in enumerate(shape_list)}
    masks = pruning.magnitude_masks(params, sparsity, scope="global")
    leaves = jax.tree.leaves(params)
    flat = np.concatenate([np.abs(np.asarray(x)).ravel() for x in leaves])
    expected = _reference_pruned(flat, round(sparsity * flat.size))
    got = np.concatenate([~np.asarray(m).ravel() for m in jax.tree.leaves(masks)])
    np.testing.assert_array_equal(got, expected)


def test_magnitude_masks_accept_per_leaf_sparsity_and_where():
    params = {"a": jnp.arange(1.0, 13.0).reshape(3, 4), "b": jnp.arange(1.0, 21.0).reshape(4, 5)}
    masks = pruning.magnitude_masks(params, {"a": 0.25, "b": 0.5})
    assert int((~masks["a"]).sum()) == 3 and int((~masks["b"]).sum()) == 10
    only_b = pruning.magnitude_masks(params, 0.5, where=lambda name, _: name == "b")
    assert only_b["a"] is None and int((~only_b["b"]).sum()) == 10


@SETTINGS
@given(shape=shapes, s1=st.floats(0.0, 0.99), s2=st.floats(0.0, 0.99), seed=st.integers(0, 99))
def test_random_masks_are_exact_deterministic_and_nested(shape, s1, s2, seed):
    lo, hi = sorted((s1, s2))
    params = {"w": jnp.zeros(shape)}
    key = jax.random.key(seed)
    m_lo = np.asarray(pruning.random_masks(key, params, lo)["w"])
    m_hi = np.asarray(pruning.random_masks(key, params, hi)["w"])
    size = math.prod(shape)
    assert (~m_lo).sum() == round(lo * size) and (~m_hi).sum() == round(hi * size)
    assert not np.any(~m_lo & m_hi), "a higher sparsity must prune a superset"
    np.testing.assert_array_equal(m_lo, np.asarray(pruning.random_masks(key, params, lo)["w"]))


def _groups(x, m, axis):
    return np.moveaxis(np.asarray(x), axis, -1).reshape(-1, m)


@SETTINGS
@given(
    rows=st.sampled_from([1, 3]),
    groups=st.sampled_from([1, 2]),
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 8), (4, 4)]),
    axis=st.sampled_from([0, -1]),
    seed=st.integers(0, 99),
    ties=st.booleans(),
)
def test_nm_masks_keep_the_n_largest_of_every_group(rows, groups, nm, axis, seed, ties):
    n, m = nm
    shape = (groups * m, rows) if axis == 0 else (rows, groups * m)
    w = _weights(shape, seed, ties)
    mask = pruning.nm_masks({"w": jnp.asarray(w)}, n, m, axis=axis)["w"]
    expected = np.stack([~_reference_pruned(g, m - n) for g in _groups(np.abs(w), m, axis)])
    np.testing.assert_array_equal(_groups(mask, m, axis), expected)
    assert np.all(_groups(mask, m, axis).sum(axis=1) == n)


@SETTINGS
@given(
    sparsity=st.floats(0.0, 0.99),
    seed=st.integers(0, 99),
    scope=st.sampled_from(["layer", "global"]),
)
def test_nm_masks_with_sparsity_are_exact_and_keep_n_per_group(sparsity, seed, scope):
    params = {
        "a": jnp.asarray(_weights((4, 8), seed, False)),
        "b": jnp.asarray(_weights((3, 4), seed + 1, True)),
    }
    masks = pruning.nm_masks(params, 2, 4, sparsity=sparsity, scope=scope)
    for name, mask in masks.items():
        assert np.all(_groups(mask, 4, -1).sum(axis=1) >= 2), name
        full = np.asarray(pruning.nm_masks(params, 2, 4)[name])
        assert not np.any(~np.asarray(mask) & full), "only N:M candidates may be pruned"
    sizes = {"a": 32, "b": 12}
    if scope == "layer":
        for name, size in sizes.items():
            assert (~np.asarray(masks[name])).sum() == min(round(sparsity * size), size // 2)
    else:
        total = sum((~np.asarray(mk)).sum() for mk in masks.values())
        assert total == min(round(sparsity * 44), 22)


@SETTINGS
@given(
    sparsity=st.floats(0.0, 0.5),
    seed=st.integers(0, 99),
    axis=st.sampled_from([0, -1]),
    ties=st.booleans(),
)
def test_nm_masks_with_sparsity_prune_lowest_candidates_in_flat_order(sparsity, seed, axis, ties):
    w = _weights((8, 8), seed, ties)
    params = {"w": jnp.asarray(w)}
    candidates = ~np.asarray(pruning.nm_masks(params, 2, 4, axis=axis)["w"]).ravel()
    order = np.lexsort((np.arange(w.size), np.abs(w).ravel()))  # by |w|, then flat index
    expected = np.zeros(w.size, bool)
    expected[order[candidates[order]][: round(sparsity * w.size)]] = True
    mask = np.asarray(pruning.nm_masks(params, 2, 4, axis=axis, sparsity=sparsity)["w"])
    np.testing.assert_array_equal(~mask.ravel(), expected)


@SETTINGS
@given(
    shape=shapes,
    sparsity=st.floats(0.0, 0.99),
    axis=st.sampled_from([0, -1]),
    norm=st.sampled_from([1, 2]),
    seed=st.integers(0, 99),
)
def test_structured_masks_zero_whole_channels_of_smallest_norm(shape, sparsity, axis, norm, seed):
    w = _weights(shape, seed, False)
    mask = np.asarray(
        pruning.structured_masks({"w": jnp.asarray(w)}, sparsity, axis=axis, norm=norm)["w"]
    )
    per_channel = np.moveaxis(mask, axis, 0).reshape(shape[axis], -1)
    assert np.all(per_channel.all(axis=1) | ~per_channel.any(axis=1)), "channels are all or none"
    rows = np.moveaxis(w, axis, 0).reshape(shape[axis], -1)
    norms = np.linalg.norm(rows, ord=norm, axis=1).astype(np.float32)
    expected = _reference_pruned(norms, round(sparsity * shape[axis]))
    np.testing.assert_array_equal(~per_channel[:, 0], expected)


def test_erk_mean_equals_target_and_small_layers_stay_dense():
    params = {"tiny": jnp.zeros((2, 2)), "mid": jnp.zeros((64, 32)), "big": jnp.zeros((300, 300))}
    for target in (0.5, 0.9, 0.98):
        s = pruning.erk(params, target)
        sizes = {k: v.size for k, v in params.items()}
        mean = sum(s[k] * sizes[k] for k in s) / sum(sizes.values())
        np.testing.assert_allclose(mean, target, rtol=0, atol=1e-9)
        assert all(0.0 <= v < 1.0 for v in s.values())
        assert s["tiny"] == 0.0 and s["mid"] < s["big"]
        masks = pruning.magnitude_masks(params, s)
        for k, mk in masks.items():
            assert (~np.asarray(mk)).sum() == round(s[k] * sizes[k])
    uniform = pruning.erk(params, 0.7, power_scale=0.0)
    np.testing.assert_allclose(list(uniform.values()), 0.7, atol=1e-12)


def test_apply_masks_zeroes_pruned_entries_as_positive_zero():
    params = {"w": jnp.array([[-1.0, 2.0], [-3.0, 4.0]]), "b": jnp.array([-5.0])}
    masks = {"w": jnp.array([[False, True], [False, True]]), "b": None}
    out = pruning.apply_masks(params, masks)
    np.testing.assert_array_equal(out["w"], np.asarray(params["w"]) * np.asarray(masks["w"]))
    assert not np.signbit(np.asarray(out["w"])).any()
    assert out["b"] is params["b"]


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 99))
def test_pack_masks_round_trips(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    packed = pruning.pack_masks({"w": jnp.asarray(mask), "b": None})
    assert packed["w"].dtype == jnp.uint8 and packed["w"].size == math.ceil(mask.size / 8)
    restored = pruning.unpack_masks(packed, {"w": jnp.zeros(shape), "b": jnp.zeros(2)})
    np.testing.assert_array_equal(restored["w"], mask)
    assert restored["b"] is None


def test_sparsity_summary_counts_nonzeros_and_prints_a_table():
    params = {"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "v": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    summary = pruning.sparsity_summary(params)
    assert [(r.name, r.size, r.nonzeros) for r in summary.rows] == [("v", 6, 6), ("w", 4, 1)]
    np.testing.assert_allclose(summary.total.sparsity, 3 / 10, atol=1e-12)
    text = str(summary)
    assert text.splitlines()[0].split() == ["name", "size", "nonzeros", "sparsity"]
    assert "total" in text.splitlines()[-1]


def test_to_sparse_round_trips_exactly_and_multiplies_like_dense(getkey):
    w = jax.random.normal(getkey(), (16, 8))
    params = {"w": w, "b": jnp.ones(8)}
    pruned = pruning.apply_masks(params, pruning.magnitude_masks(params, 0.9))
    sp = pruning.to_sparse(pruned)
    assert isinstance(sp["w"], jsparse.BCOO) and not isinstance(sp["b"], jsparse.BCOO)
    assert sp["w"].nse == np.count_nonzero(np.asarray(pruned["w"]))
    back = pruning.from_sparse(sp)
    assert back["w"].dtype == pruned["w"].dtype
    np.testing.assert_array_equal(back["w"], pruned["w"])
    x = jax.random.normal(getkey(), (3, 16))
    np.testing.assert_allclose(x @ sp["w"], x @ pruned["w"], rtol=1e-5, atol=1e-6)


def test_to_sparse_works_on_nnx_state():
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pruned = pruning.apply_masks(state, pruning.magnitude_masks(state, 0.5))
    back = pruning.from_sparse(pruning.to_sparse(pruned))
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------- schedules


def test_polynomial_schedule_follows_zhu_gupta_at_update_steps_and_holds_between():
    sf, si, t0, t1, dt = 0.9, 0.1, 10, 47, 5
    sched = pruning.polynomial_schedule(sf, t0, t1, initial_sparsity=si, frequency=dt)
    updates = [t for t in range(70) if bool(sched.is_update_step(t))]
    assert updates == [*range(t0, t1, dt), t1]
    last = None
    for t in range(70):
        if t < t0:
            expected = 0.0
        else:
            if t in updates:
                last = t
            expected = sf + (si - sf) * (1 - (last - t0) / (t1 - t0)) ** 3
        np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(sched(1000)), sf, rtol=1e-7)
    # The ramp ends exactly at the target on its last step (off the frequency grid here).
    assert bool(sched.is_update_step(t1)) and sched(t1) == np.float32(sf) > sched(t1 - 1)
    traced = jax.jit(jax.vmap(sched))(jnp.arange(70))
    np.testing.assert_allclose(traced, [sched(t) for t in range(70)], rtol=1e-6)


def test_one_shot_and_constant_schedules():
    sched = pruning.one_shot(4, 0.75)
    np.testing.assert_array_equal([float(sched(t)) for t in range(6)], [0, 0, 0, 0, 0.75, 0.75])
    assert [bool(sched.is_update_step(t)) for t in range(6)] == [False] * 4 + [True, False]
    const = pruning.constant(0.5, frequency=3)
    assert float(const(11)) == 0.5
    assert [bool(const.is_update_step(t)) for t in range(7)] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]


# ------------------------------------------------------------------ errors


def _p():
    return {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pruning.magnitude_masks(_p(), 1.0), ValueError, r"sparsity must lie in \[0, 1\)"),
        (lambda: pruning.magnitude_masks(_p(), -0.1), ValueError, "sparsity=-0.1"),
        (lambda: pruning.magnitude_masks(_p(), 0.5, scope="net"), ValueError, "scope"),
        (lambda: pruning.magnitude_masks(_p(), 0.5, where=lambda *_: False), ValueError, "where"),
        (lambda: pruning.magnitude_masks(_p(), {"x": 0.5}), ValueError, "missing"),
        (lambda: pruning.magnitude_masks(_p(), {"w": 1.5}), ValueError, "sparsity"),
        (
            lambda: pruning.magnitude_masks(_p(), {"w": 0.5}, scope="global"),
            ValueError,
            "single number",
        ),
        (lambda: pruning.random_masks(jax.random.key(0), _p(), 1.2), ValueError, "sparsity"),
        (lambda: pruning.nm_masks(_p(), 5, 4), ValueError, "n must satisfy n <= m"),
        (lambda: pruning.nm_masks(_p(), 0, 4), ValueError, "n must be an integer"),
        (lambda: pruning.nm_masks(_p(), 2, 3), ValueError, "m must divide"),
        (lambda: pruning.nm_masks(_p(), 2, 4, axis=2), ValueError, "axis"),
        (lambda: pruning.nm_masks(_p(), 2, 4, sparsity=1.0), ValueError, "sparsity"),
        (lambda: pruning.structured_masks(_p(), 0.5, norm=3), ValueError, "norm"),
        (lambda: pruning.structured_masks(_p(), 1.0), ValueError, "sparsity"),
        (lambda: pruning.erk(_p(), 1.0), ValueError, "sparsity"),
        (lambda: pruning.polynomial_schedule(0.9, 10, 10), ValueError, "end_step"),
        (lambda: pruning.polynomial_schedule(0.9, 10, 5), ValueError, "end_step"),
        (lambda: pruning.polynomial_schedule(1.0, 0, 5), ValueError, "final_sparsity"),
        (
            lambda: pruning.polynomial_schedule(0.9, 0, 5, initial_sparsity=-1.0),
            ValueError,
            "initial_sparsity",
        ),
        (lambda: pruning.polynomial_schedule(0.9, -1, 5), ValueError, "begin_step"),
        (lambda: pruning.polynomial_schedule(0.9, 0, 5, frequency=0), ValueError, "frequency"),
        (lambda: pruning.polynomial_schedule(0.9, 0, 5, power=0.0), ValueError, "power"),
        (lambda: pruning.polynomial_schedule(0.9, 0, True), ValueError, "end_step"),
        (lambda: pruning.polynomial_schedule(0.9, 0, 5, power="x"), ValueError, "power="),
        (lambda: pruning.polynomial_schedule("0.9", 0, 5), TypeError, "final_sparsity="),
        (lambda: pruning.magnitude_masks(_p(), "0.5"), TypeError, r"sparsity='0.5'"),
        (
            lambda: pruning.prune(1.5),
            ValueError,
            r"schedule must lie in \[0, 1\); got schedule=1.5",
        ),
        (lambda: pruning.prune(0.5, axis="x"), TypeError, "axis must be an int"),
        (lambda: pruning.one_shot(-1, 0.5), ValueError, "step"),
        (lambda: pruning.one_shot(0, 1.0), ValueError, "sparsity"),
        (lambda: pruning.constant(0.5, frequency=0), ValueError, "frequency"),
        (lambda: pruning.prune("fast"), TypeError, "schedule"),
        (lambda: pruning.prune(0.5, method="lottery"), ValueError, "method"),
        (lambda: pruning.prune(0.5, scope="net"), ValueError, "scope"),
        (lambda: pruning.prune(0.5, distribution="normal"), ValueError, "distribution"),
        (lambda: pruning.prune(0.5, method="nm"), ValueError, "n must be an integer"),
        (lambda: pruning.prune(0.5, method="nm", n=5, m=4), ValueError, "n must satisfy"),
        (lambda: pruning.prune(0.9, method="nm", n=2, m=4), ValueError, "final_sparsity=0.9"),
        (lambda: pruning.prune(0.5, n=2, m=4), ValueError, "only used by method='nm'"),
        (lambda: pruning.prune(0.5, method="random"), ValueError, "key"),
        (lambda: pruning.prune(0.5, key=jax.random.key(0)), ValueError, "key"),
        (lambda: pruning.prune(0.5, method="structured", scope="global"), ValueError, "scope"),
        (lambda: pruning.prune(0.5, method="structured", norm=0), ValueError, "norm"),
        (lambda: pruning.prune(0.5, axis=0), ValueError, "axis is only used by method 'nm'"),
        (lambda: pruning.prune(jnp.float32(1.5)), ValueError, r"schedule must lie in \[0, 1\)"),
        (
            lambda: optax.inject_hyperparams(pruning.prune)(1.0).init(_p()),
            ValueError,
            r"schedule must lie in \[0, 1\)",
        ),
        (
            lambda: pruning.magnitude_masks(_p(), jnp.float32(-0.5)),
            ValueError,
            r"sparsity must lie in \[0, 1\)",
        ),
        (lambda: pruning.prune(0.5, method="nm", n=2, m=4, norm=1), ValueError, "norm=1 with"),
        (
            lambda: pruning.prune(0.5, update_fraction=0.1),
            ValueError,
            "update_fraction is only used by method 'set' or 'rigl'; got update_fraction=0.1",
        ),
        (lambda: pruning.prune(0.5, method="ste", update_end=9), ValueError, "update_end="),
        (lambda: pruning.prune(0.5, packed="yes"), TypeError, "packed must be a bool"),
        (lambda: pruning.prune(0.5, normalize=1), TypeError, "normalize must be a bool"),
        (
            lambda: pruning.prune(0.5, distribution="erk", scope="global"),
            ValueError,
            "distribution='erk'",
        ),
        (lambda: pruning.prune(0.5, where=lambda *_: False).init(_p()), ValueError, "where"),
        (lambda: pruning.magnitude_masks(_p(), 0.5, block=(0, 4)), ValueError, "block="),
        (lambda: pruning.magnitude_masks(_p(), 0.5, block=(3, 4)), ValueError, "tile"),
        (lambda: pruning.prune(0.5, block=[2, 2]), ValueError, "block must be a pair"),
        (lambda: pruning.prune(0.5, method="saliency"), ValueError, "inner="),
        (
            lambda: pruning.prune(0.5, method="random", key=jax.random.key(0), block=(1, 4)),
            ValueError,
            "block and normalize",
        ),
        (lambda: pruning.prune(np.ones(2)), TypeError, "scalar array"),
        (lambda: pruning.prune(0.5, method="static", masks={}), ValueError, "schedule=None"),
        (lambda: pruning.prune(None, method="static"), ValueError, "masks="),
        (lambda: pruning.prune(0.5, masks={"w": None}), ValueError, "only used by method='static'"),
        (
            lambda: pruning.prune(
                None, method="static", masks={"w": jnp.ones(3, bool), "b": None}
            ).init(_p()),
            ValueError,
            "shape of their leaf",
        ),
        (
            lambda: pruning.prune(0.5, method="structured", norm=np.int64(3)),
            ValueError,
            "norm must be 1 or 2",
        ),
        (
            lambda: pruning.prune(0.5, method="nm", n=1, m=2).init({"w": jnp.ones((2, 3))}),
            ValueError,
            "m must divide",
        ),
        (
            lambda: pruning.prune(0.5).update(_p(), pruning.prune(0.5).init(_p())),
            ValueError,
            "params",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------- transform


def _mlp_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "l1": {"kernel": jax.random.normal(k1, (16, 24)), "bias": jnp.zeros(24)},
        "l2": {"kernel": jax.random.normal(k2, (24, 8)), "bias": jnp.zeros(8)},
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None, :])
    return jnp.mean((h @ params["l2"]["kernel"] + params["l2"]["bias"][None, :] - y) ** 2)


def _optimizers():
    opts = {
        "optax.adam": optax.adam(1e-2),
        "optax.rmsprop": optax.rmsprop(1e-2),
        "optax.sgd": optax.sgd(1e-2, momentum=0.9),
    }
    from jaxopt_nn import optim

    opts["jaxopt_nn.adam"] = optim.adam(1e-2)
    opts["jaxopt_nn.rmsprop"] = optim.rmsprop(1e-2)
    return opts


def _run(tx, params, steps, key, check=None):
    x = jax.random.normal(key, (32, 16))
    y = jnp.sin(x[:, :8])
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state)
        if check is not None:
            check(t, params, state)
    return params, state, len(traces)


def _prune_state(state):
    return next(
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, pruning.PruneState))
        if isinstance(s, pruning.PruneState)
    )


@pytest.mark.parametrize("opt", list(_optimizers()))
def test_prune_after_optimizer_keeps_pruned_weights_exactly_zero_on_schedule(opt, getkey):
    sched = pruning.polynomial_schedule(0.8, 5, 40, frequency=5)
    tx = optax.chain(_optimizers()[opt], pruning.prune(sched))

    def check(t, params, state):
        masks = _prune_state(state).masks
        assert np.asarray(masks["l1"]["bias"]).all(), "unselected leaves are all kept"
        for name in ("l1", "l2"):
            w, mk = np.asarray(params[name]["kernel"]), np.asarray(masks[name]["kernel"])
            np.testing.assert_array_equal(w[~mk].view(np.uint32), 0)  # bit-exact +0.0
            expected = _round_f32(_jitted_value(sched, t), w.size)
            assert (w == 0).sum() == (~mk).sum() == expected, (t, name)

    params, _, compiles = _run(tx, _mlp_params(getkey()), 50, getkey(), check)
    assert compiles == 1
    assert np.count_nonzero(np.asarray(params["l1"]["bias"])) > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "magnitude", "scope": "global"},
        {"method": "random", "key": jax.random.key(3)},
        {"method": "magnitude", "distribution": "erk"},
        {"method": "structured", "norm": 1},
    ],
)
def test_prune_methods_follow_the_schedule(kwargs, getkey):
    sched = pruning.polynomial_schedule(0.75, 0, 20, frequency=4)
    tx = optax.chain(optax.adam(1e-2), pruning.prune(sched, **kwargs))
    params, state, compiles = _run(tx, _mlp_params(getkey()), 25, getkey())
    kernels = [np.asarray(params[n]["kernel"]) for n in ("l1", "l2")]
    zeros = sum((k == 0).sum() for k in kernels)
    sizes = [k.size for k in kernels]
    if kwargs["method"] == "structured":
        for k in kernels:
            assert (k == 0).all(axis=0).sum() == round(0.75 * k.shape[1])
    elif kwargs.get("scope") == "global":
        assert zeros == round(0.75 * sum(sizes))
    elif kwargs.get("distribution") == "erk":
        s = pruning.erk(params, 0.75)
        for n, k in zip(("l1", "l2"), kernels, strict=True):
            assert abs((k == 0).sum() - s[f"{n}/kernel"] * k.size) <= 1
    else:
        assert [(k == 0).sum() for k in kernels] == [round(0.75 * n) for n in sizes]
    assert compiles == 1


def test_nm_prune_is_gradual_and_ends_exactly_n_of_m(getkey):
    sched = pruning.polynomial_schedule(0.5, 0, 30, frequency=3)
    tx = optax.chain(optax.adam(1e-2), pruning.prune(sched, method="nm", n=2, m=4))
    seen = []

    def check(t, params, state):
        for name in ("l1", "l2"):
            w = np.asarray(params[name]["kernel"])
            assert np.all(_groups(w != 0, 4, -1).sum(axis=1) >= 2)
            assert (w == 0).sum() == _round_f32(_jitted_value(sched, t), w.size)
        seen.append(float(sched(t)))

    params, _, _ = _run(tx, _mlp_params(getkey()), 35, getkey(), check)
    assert seen[0] == 0.0 and 0.0 < seen[3] < seen[9] < 0.5, "N:M must ramp, not jump to N:M"
    for name in ("l1", "l2"):
        assert np.all(_groups(np.asarray(params[name]["kernel"]) != 0, 4, -1).sum(axis=1) == 2)


def test_prune_masks_change_only_on_update_steps(getkey):
    sched = pruning.polynomial_schedule(0.6, 2, 12, frequency=5)
    tx = optax.chain(optax.adam(1e-2), pruning.prune(sched))
    history = []
    _run(
        tx,
        _mlp_params(getkey()),
        15,
        getkey(),
        lambda t, p, s: history.append(np.asarray(_prune_state(s).masks["l1"]["kernel"])),
    )
    changed = [t for t in range(1, 15) if not np.array_equal(history[t], history[t - 1])]
    assert all(bool(sched.is_update_step(t)) for t in changed), changed
    growing = [t for t in range(1, 15) if float(sched(t)) > float(sched(t - 1))]
    assert growing == [7, 12] and set(growing) <= set(changed)


@pytest.mark.parametrize("inner", ["optax.adam", "jaxopt_nn.adam", "jaxopt_nn.adam 8-bit"])
def test_prune_with_inner_keeps_moments_of_pruned_weights_zero(inner, getkey):
    from jaxopt_nn import optim

    sched = pruning.polynomial_schedule(0.7, 0, 20, frequency=2)
    eight_bit = optim.BlockQuantization(block_size=64, min_size=64)
    tx = pruning.prune(
        sched,
        inner={
            "optax.adam": optax.adam(1e-2),
            "jaxopt_nn.adam": optim.adam(1e-2),
            "jaxopt_nn.adam 8-bit": optim.adam(1e-2, eight_bit=eight_bit),
        }[inner],
    )
    params, state, compiles = _run(tx, _mlp_params(getkey()), 30, getkey())
    adam_state = state.inner_state[0]
    for name in ("l1", "l2"):
        mk = np.asarray(state.masks[name]["kernel"])
        assert (np.asarray(params[name]["kernel"])[~mk] == 0).all()
        mu, nu = adam_state.mu[name]["kernel"], adam_state.nu[name]["kernel"]
        if isinstance(mu, optim.BlockQuantizedArray):
            mu = _blockwise.dequantize(mu, "signed", mk.shape, eight_bit)
            nu = _blockwise.dequantize(nu, "sqrt", mk.shape, eight_bit)
            # code 0 of the sqrt code is the smallest root, 2**-15 * block scale
            assert np.all(np.asarray(nu)[~mk] <= 2.0**-30 * float(np.max(nu)))
        else:
            np.testing.assert_array_equal(np.asarray(nu)[~mk], 0)
        np.testing.assert_array_equal(np.asarray(mu)[~mk], 0)
        assert np.count_nonzero(np.asarray(mu)[mk]) > 0
        assert (~mk).sum() == round(0.7 * mk.size)
    assert compiles == 1


def test_prune_works_with_nnx_optimizer():
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    tx = optax.chain(optax.adam(1e-2), pruning.prune(pruning.one_shot(1, 0.5)))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x, y = jnp.ones((4, 8)), jnp.zeros((4, 4))

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(model, optimizer)
    for layer in model.layers:
        assert (np.asarray(layer.kernel[...]) == 0).sum() == layer.kernel[...].size // 2
        assert np.count_nonzero(np.asarray(layer.bias[...])) > 0


def test_prune_with_8_bit_adam_traces_on_nnx_state():
    # nnx.Param-wrapped leaves: the zeroed 8-bit codes keep the state's tree
    # (one compilation), and the moments of pruned weights stay zero.
    from jaxopt_nn import optim

    model = nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0)), nnx.Linear(64, 4, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    eight_bit = optim.BlockQuantization(block_size=64, min_size=64)
    tx = pruning.prune(
        pruning.constant(0.5, frequency=2), inner=optim.adam(1e-2, eight_bit=eight_bit)
    )
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    mk = np.asarray(state.masks["layers"][0]["kernel"][...])
    mu = state.inner_state[0].mu["layers"][0]["kernel"]
    mu = mu.get_value() if isinstance(mu, nnx.Variable) else mu
    assert isinstance(mu, optim.BlockQuantizedArray)
    mu = _blockwise.dequantize(mu, "signed", mk.shape, eight_bit)
    assert (~mk).sum() == mk.size // 2
    np.testing.assert_array_equal(np.asarray(mu)[~mk], 0)
    np.testing.assert_array_equal(np.asarray(params["layers"][0]["kernel"][...])[~mk], 0)


def test_prune_works_with_linen_dicts():
    module = linen.Dense(6)
    variables = module.init(jax.random.key(0), jnp.ones((1, 5)))
    tx = optax.chain(optax.sgd(0.1), pruning.prune(0.5))
    state = tx.init(variables)
    grads = jax.tree.map(jnp.ones_like, variables)
    updates, state = tx.update(grads, state, variables)
    new = optax.apply_updates(variables, updates)
    assert (np.asarray(new["params"]["kernel"]) == 0).sum() == 15
    np.testing.assert_array_equal(new["params"]["bias"], variables["params"]["bias"] - 0.1)


@pytest.mark.parametrize("inner", [False, True])
def test_prune_state_round_trips_through_orbax(inner, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = _mlp_params(jax.random.key(0))
    tx = pruning.prune(0.5, inner=optax.adam(1e-3) if inner else None)
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(
            tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_lenet_300_100_pruned_gradually_to_90_percent_stays_within_a_point_of_dense():
    # As in Han et al.: train dense, then prune gradually while retraining. Global
    # magnitude ranking leaves the small output layer denser than the hidden ones.
    from jaxopt_nn import data, models, train

    ds = data.load_digits()
    batch_size = 64
    steps_per_epoch = len(ds.x_train) // batch_size
    dense = train.fit(
        models.LeNet300100(64, rngs=nnx.Rngs(0)),
        optax.adam(1e-3),
        ds,
        epochs=20,
        batch_size=batch_size,
        progress=False,
    )
    sched = pruning.polynomial_schedule(
        0.9, 0, 10 * steps_per_epoch, frequency=steps_per_epoch // 2
    )
    pruned = train.fit(
        train.to_model(dense.graphdef, dense.state),
        optax.chain(optax.adam(1e-3), pruning.prune(sched, scope="global")),
        ds,
        epochs=20,
        batch_size=batch_size,
        progress=False,
    )
    summary = pruning.sparsity_summary(pruned.state.params)
    kernels = [row for row in summary.rows if row.name.endswith("kernel")]
    assert len(kernels) == 3
    total = sum(row.size for row in kernels)
    assert total - sum(row.nonzeros for row in kernels) == round(0.9 * total)
    acc_dense = dense.history[-1]["test_accuracy"]
    acc_pruned = pruned.history[-1]["test_accuracy"]
    assert acc_pruned >= acc_dense - 0.01, (acc_dense, acc_pruned)


# ------------------------------------------------- optax and sharding contracts


def test_masks_are_selected_without_sorting():
    params = {"w": jnp.ones((6, 5)), "v": jnp.ones((4, 4))}
    for scope in ("layer", "global"):
        jaxpr = str(
            jax.make_jaxpr(lambda p, s=scope: pruning.magnitude_masks(p, 0.5, scope=s))(params)
        )
        assert "sort" not in jaxpr, scope


_jitted_magnitude_masks = jax.jit(pruning.magnitude_masks)


@SETTINGS
@given(
    seed=st.integers(0, 99), k=st.integers(0, 40), dtype=st.sampled_from(["bfloat16", "float16"])
)
def test_selection_matches_stable_argsort_on_low_precision_ties(seed, k, dtype):
    # Few distinct low-precision magnitudes: ties straddle the threshold.
    w = jnp.asarray(_weights((5, 8), seed, True) / 4, dtype)
    mask = _jitted_magnitude_masks({"w": w}, np.float32(k / 40))["w"]
    expected = _reference_pruned(np.abs(np.float32(w)), _round_f32(k / 40, 40))
    np.testing.assert_array_equal(~np.asarray(mask), expected)


def test_prune_state_maps_like_params_with_optax_map_params():
    params = _mlp_params(jax.random.key(0))
    tx = optax.chain(optax.adam(1e-2), pruning.prune(0.5))
    state = tx.init(params)
    specs = jax.tree.map(lambda leaf: f"spec{leaf.ndim}", params)
    mapped = optax.tree.map_params(tx, lambda _, spec: spec, state, specs)
    assert mapped[1].masks == specs
    assert mapped[0][0].mu == specs
    plus = optax.tree.map_params(tx, lambda mk: mk.astype(jnp.int32) + 1, state)
    assert all(np.all(np.asarray(x) == 2) for x in jax.tree.leaves(plus[1].masks))


def test_prune_with_inner_state_maps_like_params():
    params = _mlp_params(jax.random.key(0))
    tx = pruning.prune(0.5, inner=optax.adam(1e-2))
    state = tx.init(params)
    shapes = optax.tree.map_params(tx, lambda leaf: leaf.shape, state)
    assert shapes.masks == jax.tree.map(lambda leaf: leaf.shape, params)
    assert shapes.inner_state[0].nu == shapes.masks


def test_every_prune_method_runs_under_an_explicit_mesh_with_sharded_masks():
    """8 CPU devices, explicit mesh axes: see parallel_scripts/explicit_mesh_prune.py."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPTS / "explicit_mesh_prune.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 4, proc.stdout


def _sgd_chain(prune_tx):
    return optax.chain(optax.sgd(1e-2), prune_tx)


def test_inject_hyperparams_with_a_number_matches_prune_and_can_change(getkey):
    params = _mlp_params(getkey())
    plain, _, _ = _run(_sgd_chain(pruning.prune(0.5)), params, 3, jax.random.key(1))
    injected_tx = _sgd_chain(optax.inject_hyperparams(pruning.prune)(0.5))
    seen = []

    def check(t, params, state):
        if t == 2:
            for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(params), strict=True):
                np.testing.assert_array_equal(a, b)
            state[1].hyperparams["schedule"] = jnp.float32(0.75)  # from the next step on
        seen.append((np.asarray(params["l1"]["kernel"]) == 0).sum())

    _, _, compiles = _run(injected_tx, params, 4, jax.random.key(1), check)
    assert seen == [round(0.5 * 16 * 24)] * 3 + [round(0.75 * 16 * 24)]
    assert compiles == 1


def test_inject_hyperparams_evaluates_a_schedule_or_keeps_it_static(getkey):
    sched = pruning.polynomial_schedule(0.8, 0, 8, frequency=2)
    params = _mlp_params(getkey())
    seen = []

    def check(t, params, state):
        w = np.asarray(params["l1"]["kernel"])
        seen.append(int((w == 0).sum()))
        assert (w == 0).sum() == _round_f32(_jitted_value(sched, t), w.size), t

    _run(_sgd_chain(optax.inject_hyperparams(pruning.prune)(sched)), params, 10, getkey(), check)
    assert seen[-1] == round(0.8 * 16 * 24) and len(set(seen)) > 2
    static = optax.inject_hyperparams(pruning.prune, static_args=("schedule", "n", "m"))
    for kwargs in ({"method": "structured"}, {"method": "nm", "n": 2, "m": 4}):
        tx = _sgd_chain(static(pruning.one_shot(0, 0.5), **kwargs))
        out, _, _ = _run(tx, params, 2, getkey())
        w = np.asarray(out["l2"]["kernel"])
        assert (w == 0).sum() == w.size // 2, kwargs


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"method": "structured", "axis": 0}, "axis"),
        ({"method": "set", "key": jax.random.key(0), "update_end": 10}, "update_end"),
    ],
)
def test_inject_hyperparams_refuses_a_traced_int_naming_static_args(kwargs, name):
    tx = optax.inject_hyperparams(pruning.prune, static_args="schedule")(
        pruning.one_shot(0, 0.5), **kwargs
    )
    with pytest.raises(TypeError, match=f"{name} must be an int.*static_args"):
        tx.init(_mlp_params(jax.random.key(0)))


def test_sparsity_stats_run_under_jit_and_agree_with_the_summary(getkey):
    params = _mlp_params(getkey())
    params["l1"]["kernel"] = params["l1"]["kernel"].at[::3].set(0.0)
    params["empty"] = jnp.zeros((0, 3))
    stats = jax.jit(pruning.sparsity_stats)(params)
    summary = pruning.sparsity_summary(params)
    for row in summary.rows:
        assert int(stats.nonzeros[row.name]) == row.nonzeros
        np.testing.assert_allclose(stats.sparsity[row.name], row.sparsity, rtol=1e-6)
    assert int(stats.total_nonzeros) == summary.total.nonzeros
    np.testing.assert_allclose(stats.total_sparsity, summary.total.sparsity, rtol=1e-6)
    assert float(stats.sparsity["empty"]) == 0.0


# ------------------------------------------- block, saliency, packed masks


@SETTINGS
@given(
    seed=st.integers(0, 99),
    sparsity=st.floats(0.0, 0.99),
    block=st.sampled_from([(1, 4), (2, 2), (4, 1), (4, 4)]),
    scope=st.sampled_from(["layer", "global"]),
)
def test_block_masks_prune_exact_block_counts_of_smallest_block_sums(seed, sparsity, block, scope):
    shapes = {"a": (8, 8), "b": (4, 12)}
    params = {
        k: jnp.asarray(_weights(s, seed + i, True)) for i, (k, s) in enumerate(shapes.items())
    }
    masks = pruning.magnitude_masks(params, sparsity, scope=scope, block=block)
    bh, bw = block
    sums, blocks = [], []
    for name, shape in shapes.items():
        tiles = np.abs(np.asarray(params[name])).reshape(shape[0] // bh, bh, shape[1] // bw, bw)
        mask = np.asarray(masks[name]).reshape(tiles.shape)
        assert np.all(mask.all(axis=(1, 3)) | ~mask.any(axis=(1, 3))), "blocks are all or none"
        sums.append(tiles.sum(axis=(1, 3)).astype(np.float32))
        blocks.append(~mask.all(axis=(1, 3)))
    if scope == "layer":
        for s, b in zip(sums, blocks, strict=True):
            np.testing.assert_array_equal(b, _reference_pruned(s, round(sparsity * s.size)))
    else:
        flat = np.concatenate([s.ravel() for s in sums])
        expected = _reference_pruned(flat, round(sparsity * flat.size))
        np.testing.assert_array_equal(np.concatenate([b.ravel() for b in blocks]), expected)


def test_saliency_masks_rank_weight_times_gradient():
    w = np.array([[1.0, -3.0, 0.5], [2.0, 1.0, -4.0]], np.float32)
    g = np.array([[4.0, 0.1, 1.0], [1.0, -1.0, 0.01]], np.float32)
    mask = pruning.saliency_masks({"w": jnp.asarray(w)}, {"w": jnp.asarray(g)}, 0.5)["w"]
    np.testing.assert_array_equal(~np.asarray(mask), _reference_pruned(np.abs(w * g), 3))


def test_normalize_balances_global_ranking_across_layers():
    rng = np.random.default_rng(0)
    params = {
        "big": jnp.asarray(rng.standard_normal((32, 32)) * 10, jnp.float32),
        "small": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32),
    }
    plain = pruning.magnitude_masks(params, 0.5, scope="global")
    assert (~np.asarray(plain["small"])).mean() > 0.8, "unnormalised: the small layer goes"
    masks = pruning.magnitude_masks(params, 0.5, scope="global", normalize=True)
    per_layer = [(~np.asarray(masks[k])).mean() for k in ("big", "small")]
    np.testing.assert_allclose(per_layer, 0.5, atol=0.1)
    assert sum((~np.asarray(m)).sum() for m in masks.values()) == 1024


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "saliency", "inner": "adam"},
        {"method": "saliency", "inner": "adam", "scope": "global", "normalize": True},
        {"method": "magnitude", "block": (2, 4)},
        {"method": "magnitude", "packed": True},
        {"method": "saliency", "inner": "adam", "block": (4, 4), "packed": True},
    ],
)
def test_prune_saliency_block_and_packed_keep_exact_zeros(kwargs, getkey):
    kwargs = dict(kwargs)
    if kwargs.pop("inner", None):
        kwargs["inner"] = optax.adam(1e-2)
        wrap = lambda tx: tx  # noqa: E731
    else:
        wrap = lambda tx: optax.chain(optax.adam(1e-2), tx)  # noqa: E731
    sched = pruning.polynomial_schedule(0.75, 0, 8, frequency=2)
    tx = wrap(pruning.prune(sched, **kwargs))
    dense_masks = pruning.prune(0.5).init(_mlp_params(getkey())).masks

    def check(t, params, state):
        stored = _prune_state(state).masks
        for name in ("l1", "l2"):
            w = np.asarray(params[name]["kernel"])
            mk = np.asarray(stored[name]["kernel"])
            if kwargs.get("packed"):
                assert mk.dtype == np.uint8 and mk.shape == (math.ceil(w.size / 8),)
                mk = np.asarray(pruning.unpack_masks(mk, w))
            np.testing.assert_array_equal(w[~mk], 0.0)
            bh, bw = kwargs.get("block", (1, 1))
            if kwargs.get("scope") != "global":
                blocks = _round_f32(_jitted_value(sched, t), w.size // (bh * bw))
                assert (~mk).sum() == blocks * bh * bw, (t, name)
            tiles = mk.reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw)
            assert np.all(tiles.all(axis=(1, 3)) | ~tiles.any(axis=(1, 3)))

    _, state, compiles = _run(tx, _mlp_params(getkey()), 10, getkey(), check)
    assert compiles == 1
    if kwargs.get("packed"):
        nbytes = sum(x.nbytes for x in jax.tree.leaves(_prune_state(state).masks))
        dense = sum(x.nbytes for x in jax.tree.leaves(dense_masks))
        # flat bits: under one byte of padding per pruned leaf, one byte per other leaf
        assert nbytes < dense / 8 + len(jax.tree.leaves(dense_masks)), (nbytes, dense)
        assert _prune_state(state).masks["l1"]["bias"].shape == ()


def test_apply_masks_takes_the_packed_state_masks(getkey):
    params = _mlp_params(getkey())
    bool_state = pruning.prune(0.6).init(params)
    packed_state = pruning.prune(0.6, packed=True).init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, bool_state = pruning.prune(0.6).update(grads, bool_state, params)
    _, packed_state = pruning.prune(0.6, packed=True).update(grads, packed_state, params)
    assert packed_state.masks["l1"]["kernel"].dtype == jnp.uint8
    out = pruning.apply_masks(params, packed_state.masks)
    expected = pruning.apply_masks(params, bool_state.masks)
    jax.tree.map(np.testing.assert_array_equal, out, expected)
    assert (np.asarray(out["l1"]["kernel"]) == 0).sum() == round(0.6 * 16 * 24)


@pytest.mark.parametrize("packed", [False, True])
def test_static_prune_trains_at_fixed_masks_from_the_first_step(packed, getkey):
    params = _mlp_params(getkey())
    ticket = pruning.magnitude_masks(_mlp_params(getkey()), 0.8)  # e.g. from a trained model
    tx = pruning.prune(None, method="static", masks=ticket, packed=packed, inner=optax.adam(1e-2))

    def check(t, params, state):
        for name in ("l1", "l2"):
            w, mk = np.asarray(params[name]["kernel"]), np.asarray(ticket[name]["kernel"])
            np.testing.assert_array_equal(w != 0, mk, err_msg=f"step {t}, {name}")
            np.testing.assert_array_equal(
                np.asarray(state.inner_state[0].mu[name]["kernel"])[~mk], 0
            )

    out, _, compiles = _run(tx, params, 4, getkey(), check)
    assert compiles == 1
    kept = np.asarray(ticket["l1"]["kernel"])
    assert np.all(np.asarray(out["l1"]["kernel"])[kept] != np.asarray(params["l1"]["kernel"])[kept])


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_dynamic_sparse_training_drops_and_grows_at_exact_sparsity(method, getkey):
    sched = pruning.constant(0.8, frequency=3)
    tx = pruning.prune(
        sched, method=method, key=jax.random.key(7), inner=optax.adam(1e-2), update_end=9
    )
    params = _mlp_params(getkey())
    targets = pruning.erk(params, 0.8)
    history = []

    def check(t, params, state):
        for name in ("l1", "l2"):
            w, mk = np.asarray(params[name]["kernel"]), np.asarray(state.masks[name]["kernel"])
            np.testing.assert_array_equal(w[~mk], 0.0)
            assert (~mk).sum() == round(targets[f"{name}/kernel"] * w.size), (t, name)
            if t and not np.array_equal(mk, history[-1][name]):
                assert t % 3 == 0 and t < 9, t
                grown = mk & ~history[-1][name]
                np.testing.assert_array_equal(w[grown], 0.0)  # grown weights start at zero
                np.testing.assert_array_equal(
                    np.asarray(state.inner_state[0].mu[name]["kernel"])[grown], 0
                )
        history.append({n: np.asarray(state.masks[n]["kernel"]) for n in ("l1", "l2")})

    _, _, compiles = _run(tx, params, 11, getkey(), check)
    assert compiles == 1
    changed = [
        t
        for t in range(1, 11)
        if any(not np.array_equal(history[t][n], history[t - 1][n]) for n in ("l1", "l2"))
    ]
    assert changed == [3, 6], changed  # no update from update_end on


@pytest.mark.parametrize("first", [np.nan, -np.inf, np.inf, -0.0, -1.0, 3.0])
def test_set_mask_update_ignores_the_gradients_values(first):
    # SET's cond waits for the gradients (bit patterns of one element each):
    # whatever they hold, its drop-and-grow runs on schedule with the same
    # masks.
    params = _mlp_params(jax.random.key(0))
    tx = pruning.prune(pruning.constant(0.8, frequency=2), method="set", key=jax.random.key(1))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    odd = jax.tree.map(lambda g: g.reshape(-1).at[0].set(first).reshape(g.shape), grads)
    update = jax.jit(tx.update)
    for step in range(3):
        _, expected = update(grads, state, params)
        _, got = update(odd, state, params)
        jax.tree.map(np.testing.assert_array_equal, got.masks, expected.masks)
        if step == 2:  # an update step: the masks moved
            assert any(
                not np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(
                    jax.tree.leaves(got.masks), jax.tree.leaves(state.masks), strict=True
                )
            )
        state = expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "magnitude"},
        {"method": "ste"},
        {"method": "set", "key": jax.random.key(0)},
        {"method": "rigl", "key": jax.random.key(0)},
        {"method": "magnitude", "packed": True},
    ],
)
def test_mask_update_cond_carries_only_masks(kwargs):
    # A conditional copies every operand its keep-branch returns, on every
    # step: only the (bool or packed) masks may pass through it, never the
    # float optimizer state or the updates.
    params = _mlp_params(jax.random.key(0))
    tx = pruning.prune(pruning.constant(0.8, frequency=4), inner=optax.adam(1e-2), **kwargs)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    text = jax.jit(tx.update).lower(grads, state, params).compile().as_text()
    results = [
        line.split("conditional(")[0] for line in text.splitlines() if "conditional(" in line
    ]
    assert results, "the mask update is gated at run time"
    for result in results:
        assert "f32" not in result and ("pred" in result or "u8" in result), result


def test_non_update_steps_leave_inner_state_as_inner_makes_it():
    # Between mask updates prune only masks the gradients: adagrad's
    # accumulators (0.1 at init, also at pruned positions) are kept exactly.
    params = _mlp_params(jax.random.key(0))
    ticket = pruning.magnitude_masks(params, 0.5)
    inner = optax.adagrad(0.1, initial_accumulator_value=0.1)
    tx = pruning.prune(None, method="static", masks=ticket, inner=inner)
    state, ref = tx.init(params), inner.init(params)
    reference = jax.jit(lambda g, r, p: inner.update(pruning.apply_masks(g, ticket), r, p))
    for t in range(3):
        grads = jax.grad(_loss)(params, jnp.full((4, 16), t + 1.0), jnp.zeros((4, 8)))
        updates, state = jax.jit(tx.update)(grads, state, params)
        expected, ref = reference(grads, ref, params)
        jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref)
        for name in ("l1", "l2"):
            mk = np.asarray(ticket[name]["kernel"])
            u, e = np.asarray(updates[name]["kernel"]), np.asarray(expected[name]["kernel"])
            np.testing.assert_array_equal(u[mk], e[mk])
            np.testing.assert_array_equal(u[~mk], -np.asarray(params[name]["kernel"])[~mk])
        params = optax.apply_updates(params, updates)


def test_ste_trains_dense_weights_through_a_masked_forward(getkey):
    sched = pruning.polynomial_schedule(0.75, 0, 6, frequency=2)
    tx = optax.chain(optax.sgd(0.1), pruning.prune(sched, method="ste"))
    params = _mlp_params(getkey())
    x = jax.random.normal(getkey(), (32, 16))
    y = jnp.sin(x[:, :8])
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        masks = state[1].masks
        grads = jax.grad(lambda p: _loss(pruning.straight_through(p, masks), x, y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    history = []
    for t in range(8):
        before = params
        params, state = step(params, state)
        mk = np.asarray(state[1].masks["l1"]["kernel"])
        assert (~mk).sum() == _round_f32(_jitted_value(sched, t), mk.size), t
        forward = pruning.straight_through(params, state[1].masks)["l1"]["kernel"]
        np.testing.assert_array_equal(np.asarray(forward)[~mk], 0.0)
        history.append(mk)
    # Pruned weights keep their dense values and keep training (dense gradients).
    w, w0 = np.asarray(params["l1"]["kernel"]), np.asarray(before["l1"]["kernel"])
    assert np.all(w[~mk] != 0) and np.any(w[~mk] != w0[~mk])
    exported = pruning.apply_masks(params, state[1].masks)
    assert (np.asarray(exported["l1"]["kernel"]) == 0).sum() == (~mk).sum()
    assert len(traces) == 1


def test_pruner_from_config_builds_the_same_transform_as_prune(getkey):
    params = _mlp_params(getkey())
    config = {
        "method": "magnitude",
        "scope": "global",
        "normalize": True,
        "block": [2, 4],
        "schedule": {"type": "polynomial", "final_sparsity": 0.5, "begin_step": 0, "end_step": 2},
    }
    direct = pruning.prune(
        pruning.polynomial_schedule(0.5, 0, 2), scope="global", normalize=True, block=(2, 4)
    )
    grads = jax.tree.map(jnp.ones_like, params)

    def after_three_steps(tx):
        state, update = tx.init(params), jax.jit(tx.update)
        for _ in range(3):
            updates, state = update(grads, state, params)
        return jax.tree.leaves(optax.apply_updates(params, updates))

    from_config = after_three_steps(pruning.pruner_from_config(config))
    for a, b in zip(from_config, after_three_steps(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    rigl = pruning.pruner_from_config(
        {"method": "rigl", "sparsity": 0.9, "seed": 0, "update_end": 10}, inner=optax.sgd(0.1)
    )
    assert pruning.erk(params, 0.9)["l1/kernel"] == pytest.approx(
        float((~np.asarray(rigl.init(params).masks["l1"]["kernel"])).mean()), abs=1e-2
    )
    with pytest.raises(ValueError, match=r"unknown keys \['sparsty'\]"):
        pruning.pruner_from_config({"sparsty": 0.5})
    with pytest.raises(ValueError, match="exactly one of 'sparsity' and 'schedule'"):
        pruning.pruner_from_config({"sparsity": 0.5, "schedule": {"type": "constant"}})
    with pytest.raises(ValueError, match="type"):
        pruning.pruner_from_config({"schedule": {"type": "cubic"}})


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        ([("sparsity", 0.5)], TypeError, r"config must be a mapping \(a dict\); got config=\["),
        ({"schedule": 0.5}, TypeError, r"config\['schedule'\] must be a mapping.*got .*=0.5"),
        (
            {"schedule": {"type": "one_shot", "sparsity": 0.5}},
            ValueError,
            r"'one_shot' takes step, sparsity \(missing a required argument: 'step'\)",
        ),
        ({"sparsity": "0.5"}, TypeError, r"config\['sparsity'\] must be a number"),
        ({"sparsity": 1.5}, ValueError, r"config\['sparsity'\] must lie in \[0, 1\)"),
        ({"sparsity": 0.5, "block": 4}, ValueError, "block must be a pair.*got block=4"),
        (
            {"sparsity": 0.5, "method": "random", "seed": 1.5},
            TypeError,
            r"config\['seed'\] must be an int; got .*=1.5",
        ),
    ],
)
def test_pruner_from_config_refuses_wrongly_typed_values_naming_them(config, error, match):
    with pytest.raises(error, match=match):
        pruning.pruner_from_config(config)


# ------------------------------------------------ contracts with other code


@SETTINGS
@given(size=st.integers(1, 40), sparsity=st.floats(0.1, 0.9), seed=st.integers(0, 99))
def test_packed_masks_of_1d_leaves_prune_the_same_weights_as_bool(size, sparsity, seed):
    rng = np.random.default_rng(seed)
    params = {"b": jnp.asarray(rng.normal(size=size), jnp.float32), "w": jnp.ones((3, 4))}
    grads = jax.tree.map(jnp.ones_like, params)
    results = []
    for packed in (False, True):
        tx = optax.chain(
            optax.sgd(0.1), pruning.prune(sparsity, where=lambda n, _: True, packed=packed)
        )
        state = tx.init(params)
        p = params
        for _ in range(2):  # a mask update, then a step with the stored masks
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        results.append((p, pruning.apply_masks(params, _prune_state(state).masks)))
    jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
    assert (np.asarray(results[1][0]["b"]) == 0).sum() == _round_f32(sparsity, size)


def test_unpack_masks_restores_the_packed_state_masks_of_prune(getkey):
    params = _mlp_params(getkey())
    grads = jax.tree.map(jnp.ones_like, params)
    states = []
    for packed in (False, True):
        tx = pruning.prune(0.6, packed=packed)
        states.append(tx.update(grads, tx.init(params), params)[1])
    restored = pruning.unpack_masks(states[1].masks, params)
    jax.tree.map(np.testing.assert_array_equal, restored, states[0].masks)
    assert restored["l1"]["bias"].shape == (24,) and bool(restored["l1"]["bias"].all())


@pytest.mark.parametrize(
    "inner",
    [
        optax.masked(optax.adam(1e-2), {"l1": True, "l2": False}),
        optax.multi_transform(
            {"adam": optax.adam(1e-2), "sgd": optax.sgd(1e-2)}, {"l1": "adam", "l2": "sgd"}
        ),
    ],
    ids=["masked", "multi_transform"],
)
def test_prune_wraps_optimizers_whose_state_holds_masked_nodes(inner, getkey):
    params = _mlp_params(getkey())
    tx = pruning.prune(0.5, inner=inner)
    reference = pruning.prune(0.5, inner=optax.adam(1e-2))
    grads = jax.grad(_loss)(params, jnp.ones((4, 16)), jnp.zeros((4, 8)))
    updates, state = tx.update(grads, tx.init(params), params)
    expected, _ = reference.update(grads, reference.init(params), params)
    # l1 is Adam's in both; pruned weights get -w, so they end exactly at zero
    np.testing.assert_array_equal(updates["l1"]["kernel"], expected["l1"]["kernel"])
    new = optax.apply_updates(params, updates)
    mask = np.asarray(state.masks["l2"]["kernel"])
    assert (~mask).sum() == round(0.5 * mask.size)
    np.testing.assert_array_equal(np.asarray(new["l2"]["kernel"])[~mask], 0.0)
    assert not np.array_equal(updates["l2"]["bias"], expected["l2"]["bias"])  # not Adam's


def test_prune_passes_the_chain_extra_arguments_to_inner():
    def scale_by_value():  # uses an extra argument, as reduce_on_plateau does
        return optax.GradientTransformationExtraArgs(
            lambda params: optax.EmptyState(),
            lambda updates, state, params=None, *, value, **extra: (
                jax.tree.map(lambda u: value * u, updates),
                state,
            ),
        )

    def plain_negate():  # a GradientTransformation that takes no extra arguments
        return optax.GradientTransformation(
            lambda params: optax.EmptyState(),
            lambda updates, state, params=None: (jax.tree.map(jnp.negative, updates), state),
        )

    params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
    grads = {"w": jnp.ones((2, 4))}
    for inner, factor in ((scale_by_value(), 3.0), (plain_negate(), -1.0)):
        tx = optax.chain(pruning.prune(0.5, inner=inner), optax.contrib.reduce_on_plateau())
        updates, _ = tx.update(grads, tx.init(params), params, value=jnp.float32(3.0))
        kept = np.asarray(params["w"]) > 4
        np.testing.assert_array_equal(np.asarray(updates["w"])[kept], factor)
        np.testing.assert_array_equal(
            np.asarray(updates["w"])[~kept], -np.asarray(params["w"])[~kept]
        )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_normalized_block_and_saliency_scores_rank_low_precision_weights_as_float32(dtype):
    rng = np.random.default_rng(0)
    values = {"a": rng.normal(size=(256, 256)), "b": 1e-2 * rng.normal(size=(64, 32))}
    params = jax.tree.map(lambda v: jnp.asarray(v, dtype), values)
    wide = jax.tree.map(lambda p: p.astype(jnp.float32), params)  # the same values
    grads = jax.tree.map(lambda p: jnp.asarray(1e-3 * rng.normal(size=p.shape), dtype), params)
    wide_grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    for kwargs in ({"scope": "global", "normalize": True}, {"block": (4, 4)}):
        got = pruning.magnitude_masks(params, 0.5, **kwargs)
        jax.tree.map(
            np.testing.assert_array_equal, got, pruning.magnitude_masks(wide, 0.5, **kwargs)
        )
    got = pruning.saliency_masks(params, grads, 0.5)
    jax.tree.map(np.testing.assert_array_equal, got, pruning.saliency_masks(wide, wide_grads, 0.5))


def test_erk_gives_a_leaf_without_weights_no_share():
    params = {"a": jnp.ones((8, 8)), "c": jnp.ones((16, 4))}
    with_empty = {**params, "z": jnp.ones((8, 0))}
    expected = pruning.erk(params, 0.5)
    got = pruning.erk(with_empty, 0.5)
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    assert 0.0 <= got["z"] <= 1.0
    tx = pruning.prune(0.5, method="set", key=jax.random.key(0))
    state = tx.init(with_empty)
    assert int((~np.asarray(state.masks["a"])).sum() + (~np.asarray(state.masks["c"])).sum()) == 64
