"""Tests for jaxopt_nn.speed: FLOPs from XLA's cost analysis and latency helpers."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxopt_nn import speed


def test_count_flops_matches_two_m_n_k_for_a_matmul():
    m, k, n = 4, 8, 3
    flops = speed.count_flops(lambda a, b: a @ b, jnp.ones((m, k)), jnp.ones((k, n)))
    assert flops == 2 * m * k * n


def test_count_flops_of_a_module_counts_its_weights_as_arguments():
    model = nnx.Linear(16, 32, rngs=nnx.Rngs(0))
    flops = speed.count_flops(model, jnp.ones((5, 16)))
    # 2 m k n for the matmul plus at least one add per output for the bias.
    assert 2 * 5 * 16 * 32 <= flops <= 2 * 5 * 16 * 32 + 2 * 5 * 32
    assert speed.count_flops(model, jax.ShapeDtypeStruct((5, 16), jnp.float32)) == flops


def test_count_flops_halves_with_half_the_output_channels():
    # Abstract modules (nnx.eval_shape): only shapes are needed.
    wide = nnx.eval_shape(lambda: nnx.Conv(3, 16, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
    narrow = nnx.eval_shape(lambda: nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    assert speed.count_flops(wide, x) == 2 * speed.count_flops(narrow, x)


def test_latency_is_positive_and_module_runs_in_place():
    model = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    before = model.kernel[...]
    seconds = speed.latency(model, jnp.ones((2, 4)), repeats=2, rounds=3)
    assert seconds > 0
    assert (model.kernel[...] == before).all()


def test_compare_latency_reports_the_ratio_of_the_medians():
    def heavy(x):  # 40 matmuls of 128 x 128: about 170 MFLOP against one addition
        return jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ x), x)

    x = jnp.full((128, 128), 0.01)
    result = speed.compare_latency(heavy, lambda x: x + 1, x, rounds=5, repeats=3)
    assert isinstance(result, speed.LatencyComparison)
    assert result.speedup > 1 and result.baseline > result.candidate > 0


@pytest.mark.parametrize("name", ["repeats", "rounds", "warmup"])
@pytest.mark.parametrize("value", [0, 1.5, True])
def test_counts_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        speed.latency(lambda x: x, jnp.ones(2), **{name: value})
    with pytest.raises(ValueError, match=name):
        speed.compare_latency(lambda x: x, lambda x: x, jnp.ones(2), **{name: value})


def test_not_callable_is_a_type_error():
    with pytest.raises(TypeError, match="fn_or_model"):
        speed.count_flops(3, jnp.ones(2))


def test_compare_latency_sizes_rounds_per_callable_when_repeats_is_none(monkeypatch):
    counts = []
    timed = speed._timed

    def spy(call, args, repeats):
        counts.append(repeats)
        return timed(call, args, repeats)

    monkeypatch.setattr(speed, "_timed", spy)

    def heavy(x):
        return jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ x), x)

    x = jnp.full((128, 128), 0.01)
    result = speed.compare_latency(
        heavy, lambda x: x + 1, x, repeats=None, rounds=2, warmup=2, round_seconds=0.05
    )
    timed_rounds = counts[4:]  # two warm-up calls of each first
    assert counts[:4] == [1, 1, 1, 1] and len(timed_rounds) == 4
    heavy_count, light_count = timed_rounds[0], timed_rounds[1]
    assert timed_rounds == [heavy_count, light_count, light_count, heavy_count]
    assert light_count > heavy_count >= 1  # the cheap call gets more calls per round
    assert result.baseline > result.candidate > 0


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True, "1"])
def test_round_seconds_is_checked(value):
    with pytest.raises(ValueError, match=r"round_seconds must be a finite number > 0; got"):
        speed.compare_latency(
            lambda x: x, lambda x: x, jnp.ones(2), repeats=None, round_seconds=value
        )
