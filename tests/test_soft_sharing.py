"""Tests for soft weight-sharing: the mixture prior as an optax transform, and its codebooks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_nn import archive, quantization
from jaxopt_nn.soft_sharing import SoftWeightSharingState, mixture_codebooks, soft_weight_sharing


def _params():
    key = jax.random.key(0)
    return {
        "w": jax.random.normal(key, (16, 8)) * 0.3,
        "b": jnp.ones(8),  # a bias: not under the prior by default
    }


def test_prior_clusters_the_kernels_and_leaves_biases_alone():
    params = _params()
    tx = optax.chain(soft_weight_sharing(5, tau=0.05, learning_rate=1e-3), optax.adam(1e-2))

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    spread0 = float(jnp.std(params["w"]))
    for _ in range(400):
        params, state = step(params, state)
    np.testing.assert_array_equal(params["b"], jnp.ones(8))
    prior = state[0]
    assert isinstance(prior, SoftWeightSharingState) and int(prior.count) == 400
    assert float(prior.means[0]) == 0.0  # the zero component never moves
    initial = tx.init(_params())[0]
    assert float(prior.log_vars[0]) == float(initial.log_vars[0])  # nor widens
    assert float(jnp.max(prior.log_vars)) <= float(initial.log_vars[0])
    # Every weight sits near a component mean, much nearer than the initial spread.
    distance = jnp.min(jnp.abs(params["w"].ravel()[:, None] - prior.means[None, :]), axis=1)
    assert float(jnp.max(distance)) < 0.1 * spread0


def test_mixture_codebooks_prune_the_zero_component_and_round_trip_through_the_archive():
    params = {"w": jnp.array([[0.001, 0.5, -0.5], [0.49, -0.002, 0.0]]), "b": jnp.zeros(3)}
    tx = soft_weight_sharing(3, tau=0.0, learning_rate=0.0)
    # Means 0, -0.5, 0.5 (over the weights' range); narrow components, as after training.
    state = tx.init(params)._replace(log_vars=jnp.full(3, 2 * np.log(0.05), jnp.float32))
    books = mixture_codebooks(params, state)
    assert list(books) == ["w"]
    book = books["w"]
    np.testing.assert_array_equal(book.mask, [[False, True, True], [True, False, False]])
    shared = quantization.codebook_weights(book)
    np.testing.assert_array_equal(shared[book.mask], np.asarray(state.means)[[2, 1, 2]])
    restored = archive.loads(archive.dumps(params, codebooks=books))["w"]
    np.testing.assert_array_equal(restored, shared)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"num_components": 1},
            ValueError,
            r"num_components must lie in \[2, 65536\]; got num_components=1",
        ),
        ({"num_components": 2.0}, TypeError, "num_components must be an int"),
        ({"tau": -1.0}, ValueError, "tau must be a finite number >= 0; got tau=-1.0"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate must be a finite number"),
        (
            {"zero_weight": 1.0},
            ValueError,
            r"zero_weight must lie in \(0, 1\); got zero_weight=1.0",
        ),
        ({"warmup_steps": -1}, ValueError, "warmup_steps must be an int >= 0; got warmup_steps=-1"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        soft_weight_sharing(**kwargs)


def test_warmup_ramps_the_prior_linearly():
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    full = soft_weight_sharing(5, tau=0.1, learning_rate=0.0)
    ramped = soft_weight_sharing(5, tau=0.1, learning_rate=0.0, warmup_steps=4)
    state = ramped.init(params)
    expected = full.update(zero, full.init(params), params)[0]["w"]
    for step in range(6):
        updates, state = ramped.update(zero, state, params)
        np.testing.assert_allclose(
            updates["w"], expected * min(1.0, (step + 1) / 4), rtol=1e-5, atol=1e-8
        )


def test_init_refuses_a_selection_of_nothing_and_update_needs_params():
    tx = soft_weight_sharing(where=lambda name, leaf: False)
    with pytest.raises(ValueError, match="where selects no leaf"):
        tx.init(_params())
    tx = soft_weight_sharing()
    state = tx.init(_params())
    with pytest.raises(ValueError, match="needs params"):
        tx.update(_params(), state)
