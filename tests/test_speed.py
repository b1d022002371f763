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
    # The sizing reads the time of the last warm-up call of each callable; the
    # spy reports fixed warm-up times (a wall clock under load could invert
    # them) and passes the timed rounds through.
    warmup_seconds = {0: 1.0, 1: 2e-3, 2: 1.0, 3: 1e-4}  # baseline x2, candidate x2
    counts = []
    timed = speed._timed

    def spy(call, args, repeats):
        index = len(counts)
        counts.append(repeats)
        seconds = timed(call, args, repeats)
        return warmup_seconds.get(index, seconds)

    monkeypatch.setattr(speed, "_timed", spy)
    x = jnp.full((8, 8), 0.01)
    result = speed.compare_latency(
        lambda x: x @ x, lambda x: x + 1, x, repeats=None, rounds=2, warmup=2, round_seconds=0.01
    )
    timed_rounds = counts[4:]
    assert counts[:4] == [1, 1, 1, 1] and len(timed_rounds) == 4
    heavy_count, light_count = int(0.01 / 2e-3), int(0.01 / 1e-4)
    assert timed_rounds == [heavy_count, light_count, light_count, heavy_count]
    assert result.baseline > 0 and result.candidate > 0


def test_compare_latency_sizes_at_least_one_call_per_round(monkeypatch):
    counts = []
    timed = speed._timed

    def spy(call, args, repeats):
        counts.append(repeats)
        timed(call, args, repeats)
        return 10.0  # every call reports far longer than a round

    monkeypatch.setattr(speed, "_timed", spy)
    speed.compare_latency(
        lambda x: x, lambda x: x + 1, jnp.ones(2), repeats=None, rounds=1, round_seconds=1e-3
    )
    assert counts[-2:] == [1, 1]


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True, "1"])
def test_round_seconds_is_checked(value):
    with pytest.raises(ValueError, match=r"round_seconds must be a finite number > 0; got"):
        speed.compare_latency(
            lambda x: x, lambda x: x, jnp.ones(2), repeats=None, round_seconds=value
        )
