"""Adam/RMSprop transforms: equality with optax, composition, 8-bit state."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxopt_nn
from jaxopt_nn import optim
from jaxopt_nn._blockwise import dequantize, filled, quantize

STEPS = 100
SCHEDULE = optax.linear_schedule(1e-2, 1e-3, transition_steps=50)
SMALL = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "c": jnp.float32(0.5)}


def _noise(params, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(steps,) + p.shape), p.dtype), params)


def _run(txs, params, steps=STEPS):
    """100 steps of each transform in ``txs`` in one jitted scan per transform.

    Gradients are ``0.1 * params + noise``, so the trajectory feeds back into
    them. Returns ``[(final params, final state, stacked updates), ...]``.
    """
    noise = _noise(params, steps)

    @jax.jit
    def run(params, noise):
        out = []
        for tx in txs:

            def step(carry, n, tx=tx):
                p, s = carry
                g = jax.tree.map(lambda a, b: 0.1 * a + b, p, n)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), u

            (p, s), us = jax.lax.scan(step, (params, tx.init(params)), noise)
            out.append((p, s, us))
        return out

    return run(params, noise)


def _assert_trees_close(actual, desired, rtol=1e-6, atol=0.0):
    assert jax.tree.structure(actual) == jax.tree.structure(desired)
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        assert a.dtype == d.dtype
        wide = np.complex64 if jnp.iscomplexobj(a) else np.float32
        np.testing.assert_allclose(np.asarray(a, wide), np.asarray(d, wide), rtol=rtol, atol=atol)


def _state_bytes(state):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))


# --------------------------------------------------------------------------- numerics


def _assert_grid_matches_optax(cases, ours_factory, optax_factory, moments):
    """Run every case (a kwargs dict) in one jit for ours and optax; compare all steps."""
    txs = [tx for kwargs in cases for tx in (ours_factory(**kwargs), optax_factory(**kwargs))]
    results = _run(txs, SMALL)
    for kwargs, ours, theirs in zip(cases, results[::2], results[1::2], strict=True):
        try:
            _assert_trees_close(ours[2], theirs[2])  # every step's updates
            _assert_trees_close(ours[0], theirs[0])
            _assert_trees_close(moments(ours[1][0]), moments(theirs[1][0]))
        except AssertionError as err:
            raise AssertionError(f"differs from optax with {kwargs}") from err
        # optax's state layout: same class name, same fields in the same order.
        assert type(ours[1][0]).__name__ == type(theirs[1][0]).__name__
        assert ours[1][0]._fields == theirs[1][0]._fields
        if "count" in ours[1][0]._fields:
            assert int(ours[1][0].count) == STEPS


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_adam_and_adamw_match_optax_for_every_combination(name, nesterov):
    cases = []
    for eps_root, mu_dtype, scheduled in itertools.product(
        [0.0, 1e-3], [None, jnp.bfloat16], [False, True]
    ):
        kwargs = dict(
            learning_rate=SCHEDULE if scheduled else 1e-2,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
        )
        if name == "adamw":
            kwargs.update(
                weight_decay=optax.linear_schedule(0.1, 0.0, 80) if scheduled else 0.1,
                mask={"w": True, "c": False} if eps_root else None,
            )
        cases.append(kwargs)
    _assert_grid_matches_optax(
        cases, getattr(optim, name), getattr(optax, name), lambda s: (s.mu, s.nu)
    )


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_rmsprop_matches_optax_for_every_combination(centered, bias_correction):
    cases = [
        dict(
            learning_rate=SCHEDULE if scheduled else 1e-2,
            decay=0.95,
            initial_scale=0.1 if centered else 0.0,
            eps_in_sqrt=eps_in_sqrt,
            centered=centered,
            momentum=momentum,
            nesterov=nesterov,
            bias_correction=bias_correction,
        )
        for (momentum, nesterov), eps_in_sqrt, scheduled in itertools.product(
            [(None, False), (0.9, False), (0.9, True)], [False, True], [False, True]
        )
    ]
    _assert_grid_matches_optax(cases, optim.rmsprop, optax.rmsprop, lambda s: s.nu)


def _nnx_params():
    return nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)


_TREES = {
    "nested_with_none_and_scalar": lambda: {
        "params": {"dense": {"kernel": jnp.ones((3, 2)), "bias": None}, "scale": jnp.float32(2.0)},
        "layers": [jnp.arange(4.0), None],
    },
    "nnx_state": _nnx_params,
    "bfloat16": lambda: {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)},
}


@pytest.mark.parametrize("tree_name", sorted(_TREES))
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_pytree_kinds_match_optax_and_keep_dtypes(tree_name, name):
    params = _TREES[tree_name]()
    kwargs = {"learning_rate": 1e-2}
    ours, theirs = _run([getattr(optim, name)(**kwargs), getattr(optax, name)(**kwargs)], params)
    rtol = 1e-2 if tree_name == "bfloat16" else 1e-6
    _assert_trees_close(ours[2], theirs[2], rtol=rtol, atol=1e-6)  # also checks dtypes
    _assert_trees_close(ours[0], theirs[0], rtol=rtol)
    assert jax.tree.structure(ours[0]) == jax.tree.structure(params)
    for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(ours[0]), strict=True):
        assert q.dtype == p.dtype
    state_in = jax.tree.map(lambda x: x.dtype, getattr(optim, name)(1e-2).init(params))
    assert jax.tree.map(lambda x: x.dtype, ours[1]) == state_in


def test_count_saturates_instead_of_overflowing():
    tx = optim.scale_by_adam()
    state = tx.init(SMALL)._replace(count=jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    _, state = tx.update(SMALL, state)
    assert int(state.count) == np.iinfo(np.int32).max


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "factory, kwargs, match",
    [
        (optim.adam, dict(learning_rate=0.1, b1=1.0), r"b1 must lie in \[0, 1\); got b1=1.0"),
        (optim.adam, dict(learning_rate=0.1, b2=-0.1), r"b2 must lie in \[0, 1\); got b2=-0.1"),
        (optim.adam, dict(learning_rate=0.1, eps=-1e-8), r"eps must be >= 0; got eps=-1e-08"),
        (optim.adam, dict(learning_rate=0.1, eps_root=-1.0), r"eps_root must be >= 0"),
        (optim.adam, dict(learning_rate="fast"), r"learning_rate must be a number or a schedule"),
        (optim.adam, dict(learning_rate=0.1, mu_dtype=jnp.int32), r"mu_dtype must be a floating"),
        (optim.adamw, dict(learning_rate=0.1, weight_decay="x"), r"weight_decay must be a number"),
        (optim.rmsprop, dict(learning_rate=None), r"learning_rate must be a number or a schedule"),
        (optim.rmsprop, dict(learning_rate=0.1, decay=1.5), r"decay must lie in \[0, 1\)"),
        (optim.rmsprop, dict(learning_rate=0.1, momentum=1.0), r"momentum must lie in \[0, 1\)"),
        (optim.rmsprop, dict(learning_rate=0.1, initial_scale=-1.0), r"initial_scale must be >= 0"),
        (
            optim.rmsprop,
            dict(learning_rate=0.1, centered=True, eight_bit=True),
            r"state_quantization must be None \(and eight_bit False\) with centered=True",
        ),
        (
            optim.adam,
            dict(
                learning_rate=0.1,
                eight_bit=True,
                state_quantization=optim.BlockQuantization(bits=4),
            ),
            r"give state_quantization or its alias eight_bit, not both",
        ),
        (
            optim.adam,
            dict(learning_rate=0.1, mu_dtype=jnp.int8),
            r"mu_dtype must be a floating or complex dtype or None; got mu_dtype=",
        ),
        (optim.scale_by_stddev, dict(eps=-1.0), r"eps must be >= 0"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), r"block_size must be an int >= 1; got block_size=0"),
        (dict(block_size=2.5), r"block_size must be an int >= 1; got block_size=2.5"),
        (dict(min_size=-1), r"min_size must be an int >= 0; got min_size=-1"),
        (dict(bits=2), r"bits must be 4 or 8; got bits=2"),
        (dict(bits=4, block_size=7), r"block_size must be even with bits=4 .* got block_size=7"),
    ],
)
def test_bad_block_quantization_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.BlockQuantization(**kwargs)


def test_eight_bit_of_wrong_type_raises():
    with pytest.raises(TypeError, match=r"eight_bit must be a bool or a BlockQuantization"):
        optim.adam(0.1, eight_bit=8)
    with pytest.raises(TypeError, match=r"state_quantization must be a BlockQuantization or None"):
        optim.rmsprop(0.1, state_quantization=8)


# --------------------------------------------------------------------------- composition


def test_inside_chain_after_clipping_matches_optax():
    ours, theirs = _run(
        [
            optax.chain(optax.clip_by_global_norm(0.5), optim.adam(1e-2)),
            optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2)),
        ],
        SMALL,
    )
    _assert_trees_close(ours[2], theirs[2])


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("adam", dict(learning_rate=1e-2, b1=0.8, eps_root=1e-6)),
        ("rmsprop", dict(learning_rate=SCHEDULE, decay=0.8, momentum=0.5)),
    ],
)
def test_inject_hyperparams_matches_optax_and_the_plain_call(name, kwargs):
    ours, theirs, plain = _run(
        [
            optax.inject_hyperparams(getattr(optim, name))(**kwargs),
            optax.inject_hyperparams(getattr(optax, name))(**kwargs),
            getattr(optim, name)(**kwargs),
        ],
        SMALL,
    )
    _assert_trees_close(ours[2], theirs[2])
    # Injected hyperparameters are float32 arrays, so ``1 - b1`` rounds in
    # float32 instead of float64: agreement to float32 rounding, not bits.
    _assert_trees_close(ours[2], plain[2], rtol=1e-4, atol=1e-9)


def test_inject_hyperparams_with_8bit_state_gives_the_plain_updates():
    # Decays stay Python floats (static), so the 8-bit codes round identically.
    kwargs = dict(learning_rate=1e-2, eight_bit=optim.BlockQuantization(block_size=8, min_size=8))
    inject = optax.inject_hyperparams(optim.adam, static_args=("b1", "b2", "eps", "eps_root"))
    injected, plain = _run([inject(**kwargs), optim.adam(**kwargs)], SMALL)
    _assert_trees_close(injected[2], plain[2])
    assert injected[1].inner_state[0].mu["w"].codes.dtype == jnp.uint8


def test_inject_hyperparams_with_traced_decays_and_8bit_state():
    # Traced decays may round a moment to the neighbouring 8-bit code on some
    # step; the updates still follow the plain run to within a small fraction.
    kwargs = dict(learning_rate=1e-2, eight_bit=optim.BlockQuantization(block_size=8, min_size=8))
    injected, plain = _run(
        [optax.inject_hyperparams(optim.adam)(**kwargs), optim.adam(**kwargs)], SMALL
    )
    assert isinstance(injected[1].inner_state[0].mu["w"], optim.BlockQuantizedArray)
    _assert_trees_close(injected[2], plain[2], rtol=1e-3, atol=1e-6)


def test_multisteps_matches_optax():
    ours, theirs = _run(
        [optax.MultiSteps(optim.adam(1e-2), 3), optax.MultiSteps(optax.adam(1e-2), 3)], SMALL
    )
    _assert_trees_close(ours[2], theirs[2])


def test_multisteps_accepts_8bit_state():
    tx = optax.MultiSteps(
        optim.adam(1e-2, eight_bit=optim.BlockQuantization(block_size=8, min_size=8)), 2
    )
    params, state, _ = _run([tx], SMALL, steps=6)[0]
    assert int(state.gradient_step) == 3
    assert state.inner_opt_state[0].nu["w"].codes.dtype == jnp.uint8


def test_masked_matches_optax():
    mask = {"w": True, "c": False}
    ours, theirs = _run(
        [optax.masked(optim.rmsprop(1e-2), mask), optax.masked(optax.rmsprop(1e-2), mask)], SMALL
    )
    _assert_trees_close(ours[2], theirs[2])
    # The masked-out leaf receives the raw gradient ``0.1 * p + noise`` each step.
    p, expected = np.float32(SMALL["c"]), []
    for n in np.asarray(_noise(SMALL)["c"]):
        expected.append(np.float32(0.1) * p + n)
        p = p + expected[-1]
    np.testing.assert_allclose(ours[2]["c"], expected, rtol=1e-5)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_nnx_optimizer_matches_optax(eight_bit):
    def train(tx):
        model = nnx.Linear(64, 80, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jnp.linspace(-1.0, 1.0, 3 * 64).reshape(3, 64)

        @nnx.jit
        def step(model, optimizer):
            grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
            optimizer.update(model, grads)

        for _ in range(5):
            step(model, optimizer)
        return nnx.state(model, nnx.Param)

    reference = train(optax.adam(1e-2))
    result = train(optim.adam(1e-2, eight_bit=eight_bit))
    if eight_bit:  # the 64x80 kernel's moments are 8-bit: steps stay close, not equal
        initial = nnx.state(nnx.Linear(64, 80, rngs=nnx.Rngs(0)), nnx.Param)
        moved = np.abs(np.asarray(reference["kernel"]) - np.asarray(initial["kernel"]))
        error = np.abs(np.asarray(result["kernel"]) - np.asarray(reference["kernel"]))
        assert np.mean(error) < 0.05 * np.mean(moved)
    else:
        _assert_trees_close(result, reference)


@pytest.mark.parametrize("eight_bit", [False, True])
def test_jit_does_not_recompile_on_the_second_step(eight_bit):
    traces = []
    tx = optim.adam(
        1e-2, eight_bit=optim.BlockQuantization(block_size=8, min_size=8) if eight_bit else False
    )

    @jax.jit
    def step(params, state):
        traces.append(None)
        updates, state = tx.update(params, state, params)
        return optax.apply_updates(params, updates), state

    params, state = SMALL, tx.init(SMALL)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("eight_bit", [False, True])
def test_state_survives_orbax_round_trip(tmp_path, eight_bit):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = optim.adam(
        1e-2, eight_bit=optim.BlockQuantization(block_size=8, min_size=8) if eight_bit else False
    )
    _, state, _ = _run([tx], SMALL, steps=3)[0]
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "state", state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(
            tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        )
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    updates, _ = tx.update(SMALL, restored, SMALL)
    expected, _ = tx.update(SMALL, state, SMALL)
    _assert_trees_close(updates, expected, rtol=0)


# --------------------------------------------------------------------------- 8-bit state


_SIZE, _BLOCK = 700, 64  # 11 blocks, the last one shorter
_Q8 = optim.BlockQuantization(block_size=_BLOCK)


@jax.jit
def _round_trip(x):
    return (
        dequantize(quantize(x, "signed", _Q8), "signed", x.shape, _Q8),
        dequantize(quantize(x, "sqrt", _Q8), "sqrt", x.shape, _Q8),
    )


def _block_max(x):
    blocks = np.pad(np.abs(x), (0, -_SIZE % _BLOCK)).reshape(-1, _BLOCK)
    return np.repeat(blocks.max(axis=1), _BLOCK)[:_SIZE]


@settings(max_examples=25, deadline=None)
@given(st.floats(-30, 30), st.integers(0, 2**31 - 1))
def test_signed_code_error_is_relative(log_scale, seed):
    x = np.random.default_rng(seed).standard_t(2, size=_SIZE).astype(np.float32)
    x = x * np.float32(2.0**log_scale)
    y = np.asarray(_round_trip(jnp.asarray(x))[0])
    # 3 mantissa bits: half a unit is 1/16 of the value; values below
    # 2**-15 of the block maximum flush to zero.
    assert np.all(np.abs(y - x) <= np.abs(x) / 16 + 2.0**-14 * _block_max(x))
    assert np.all(np.sign(y) * np.sign(x) >= 0)


@settings(max_examples=25, deadline=None)
@given(st.floats(-30, 30), st.integers(0, 2**31 - 1))
def test_sqrt_code_error_is_relative_in_the_root_and_never_rounds_to_zero(log_scale, seed):
    root = np.abs(np.random.default_rng(seed).standard_t(2, size=_SIZE)).astype(np.float32)
    x = root * root * np.float32(2.0**log_scale)
    y = np.asarray(_round_trip(jnp.asarray(x))[1])
    r, s, rmax = np.sqrt(x), np.sqrt(y), _block_max(np.sqrt(x))
    # 4 mantissa bits on the root: half a unit is 1/32 of the root.
    assert np.all(np.abs(s - r) <= r / 32 * 1.0001 + 2.0**-15 * rmax)
    assert np.all(s >= np.minimum(r * (1 - 1 / 32), 2.0**-15 * rmax / 1.9375 * 0.999))


@pytest.mark.parametrize("bits, codes_shape", [(8, (3, _SIZE)), (4, (3, _SIZE // 2))])
def test_quantized_layout_keeps_the_tensor_shape_without_padding(bits, codes_shape):
    quantization = optim.BlockQuantization(bits=bits, block_size=_BLOCK)
    q = quantize(jnp.ones((3, _SIZE)), "signed", quantization)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == codes_shape
    assert q.scales.dtype == jnp.float32 and q.scales.shape == (3, 11)


@pytest.mark.parametrize(
    "code, fill", [("signed", 0.0), ("signed", 0.3), ("sqrt", 0.0), ("sqrt", 2.0)]
)
def test_filled_equals_quantizing_a_full_array(code, fill):
    expected = quantize(jnp.full((_SIZE,), fill), code, _Q8)
    actual = filled(jax.ShapeDtypeStruct((_SIZE,), jnp.float32), fill, code, _Q8)
    np.testing.assert_array_equal(actual.codes, expected.codes)
    np.testing.assert_allclose(actual.scales, expected.scales, rtol=1e-7)


def test_zero_blocks_decode_to_zero():
    for code in ("signed", "sqrt"):
        q = quantize(jnp.zeros(_SIZE), code, _Q8)
        np.testing.assert_array_equal(dequantize(q, code, (_SIZE,), _Q8), np.zeros(_SIZE))


def _lenet_params():
    from jaxopt_nn.models import LeNet300100

    return nnx.state(LeNet300100(64, rngs=nnx.Rngs(0)), nnx.Param)


def _quantized_bytes(shape, quantization):
    """Bytes of one moment: codes (n or ceil(n / 2) per row) and one float32 per block."""
    rows, n = math.prod(shape[:-1]), shape[-1]
    codes = n if quantization.bits == 8 else -(-n // 2)
    return rows * (codes + 4 * -(-n // quantization.block_size))


@pytest.mark.parametrize("bits, bound", [(8, 0.3), (4, 0.2)])
def test_quantized_state_bytes_count_scales_and_small_leaves(bits, bound):
    params = _lenet_params()
    quant = optim.BlockQuantization(bits=bits)
    state_q = jax.jit(optim.adam(1e-3, state_quantization=quant).init)(params)
    state32 = jax.jit(optim.adam(1e-3).init)(params)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    expected = 4  # count
    for p in jax.tree.leaves(params):
        n = math.prod(p.shape)
        if n >= quant.min_size:
            expected += 2 * _quantized_bytes(p.shape, quant)
        else:
            expected += 2 * n * p.dtype.itemsize
    assert _state_bytes(state_q) == expected
    assert _state_bytes(state32) == 8 * n_params + 4
    assert _state_bytes(state_q) <= bound * _state_bytes(state32)
    mu = state_q[0].mu
    assert isinstance(mu["fc1"]["kernel"], optim.BlockQuantizedArray)
    assert isinstance(mu["fc1"]["bias"], nnx.Param)


@pytest.mark.parametrize("bits, bound", [(8, 0.255), (4, 0.14)])
def test_quantized_state_of_a_large_kernel_is_a_fraction_of_float32(bits, bound):
    params = {"w": jax.ShapeDtypeStruct((512, 1024), jnp.float32)}
    quant = optim.BlockQuantization(bits=bits)
    state_q = jax.eval_shape(optim.adam(1e-3, state_quantization=quant).init, params)
    state32 = jax.eval_shape(optim.adam(1e-3).init, params)
    ratio = _state_bytes(state_q) / _state_bytes(state32)
    assert ratio <= bound
    assert _state_bytes(state_q) == 4 + 2 * _quantized_bytes((512, 1024), quant)


@pytest.mark.parametrize("min_size", [0, 4096])
def test_8bit_accepts_python_scalar_leaves(min_size):
    eight_bit = optim.BlockQuantization(block_size=4, min_size=min_size)
    params = {"s": 1.0, "w": jnp.ones((8, 8))}
    grads = {"s": 0.5, "w": jnp.full((8, 8), 0.5)}
    ours = optim.adam(1e-2, eight_bit=eight_bit)
    updates, state = ours.update(grads, ours.init(params), params)
    expected, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    assert isinstance(state[0].mu["s"], optim.BlockQuantizedArray) == (min_size == 0)
    # One step from zero moments: the 8-bit codes hold |g| and g**2 to within 1/16.
    np.testing.assert_allclose(updates["s"], expected["s"], rtol=1 / 16)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1 / 16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_8bit_keeps_dtypes_and_tracks_float_state(name, dtype):
    # 70 * 70 = 4900 elements: not a multiple of the block size (padding).
    params = {"w": jnp.linspace(-1, 1, 4900, dtype=dtype).reshape(70, 70), "b": jnp.ones(3, dtype)}
    factory = getattr(optim, name)
    (p8, s8, u8), (p32, _, _) = _run(
        [factory(1e-2, eight_bit=True), factory(1e-2)], params, steps=50
    )
    assert jax.tree.map(lambda x: x.dtype, u8) == jax.tree.map(lambda x: x.dtype, params)
    assert jax.tree.map(lambda x: x.dtype, s8) == jax.tree.map(
        lambda x: x.dtype, factory(1e-2, eight_bit=True).init(params)
    )
    moved = np.abs(np.asarray(p32["w"], np.float32) - np.asarray(params["w"], np.float32))
    error = np.abs(np.asarray(p8["w"], np.float32) - np.asarray(p32["w"], np.float32))
    assert np.median(moved) > 0.02
    # Each step's m and sqrt(v) are rounded by up to 1/16 and 1/32 of their
    # value; over 50 steps the drift stays well under 1/8 of the movement.
    # bfloat16 spacing near 1 (2**-8) alone is ~7% of the median movement.
    assert np.mean(error) < (1 / 8 if dtype == jnp.float32 else 1 / 5) * np.mean(moved)
    # Small leaves keep floating-point moments: same steps up to XLA fusion rounding.
    np.testing.assert_allclose(p8["b"], p32["b"], rtol=1e-6)


def test_8bit_adam_trains_lenet_on_digits_within_one_point_of_float32():
    from jaxopt_nn import data, train
    from jaxopt_nn.models import LeNet300100

    digits = data.load_digits()
    accuracy = {}
    for eight_bit in (False, True):
        result = train.fit(
            LeNet300100(64, rngs=nnx.Rngs(0)),
            optim.adam(1e-3, eight_bit=eight_bit),
            digits,
            epochs=15,
            batch_size=64,
            progress=False,
        )
        metrics = train.evaluate(result.graphdef, result.state, digits.x_test, digits.y_test)
        accuracy[eight_bit] = metrics["accuracy"]
    assert accuracy[False] > 0.9
    assert abs(accuracy[True] - accuracy[False]) <= 0.01


# --------------------------------------------------------------------------- complex


_COMPLEX = {"w": jnp.array([[1.0 + 2.0j, -0.5j], [3.0, 0.25 - 1.0j]], jnp.complex64)}


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("adam", {}),
        ("adam", {"mu_dtype": jnp.complex64, "nesterov": True}),
        ("adamw", {"weight_decay": 0.1}),
        ("nadamw", {}),
        ("rmsprop", {"bias_correction": True}),
        ("rmsprop", {"centered": True, "momentum": 0.9}),
    ],
)
def test_complex_params_match_optax(name, kwargs):
    ours, theirs = _run(
        [getattr(optim, name)(1e-2, **kwargs), getattr(optax, name)(1e-2, **kwargs)],
        _COMPLEX,
        steps=20,
    )
    _assert_trees_close(ours[2], theirs[2], rtol=1e-5, atol=1e-7)
    _assert_trees_close(ours[0], theirs[0], rtol=1e-6)


def test_complex_second_moment_is_the_squared_modulus():
    # g = 1j: Adam's first step is -lr * g / |g| = -0.1j (g**2 = -1 would flip it).
    tx = optim.adam(0.1)
    params = jnp.zeros(1, jnp.complex64)
    updates, state = tx.update(jnp.ones(1, jnp.complex64) * 1j, tx.init(params))
    np.testing.assert_allclose(updates, [-0.1j], rtol=1e-5)
    np.testing.assert_allclose(state[0].nu, [1e-3], rtol=1e-6)


def test_quantized_state_refuses_large_complex_leaves():
    tx = optim.adam(1e-2, eight_bit=optim.BlockQuantization(block_size=8, min_size=4))
    with pytest.raises(TypeError, match=r"stores real moments only; got a complex complex64 leaf"):
        tx.init(_COMPLEX)
    # Below min_size a complex leaf keeps floating-point moments.
    small = optim.adam(1e-2, eight_bit=optim.BlockQuantization(min_size=5)).init(_COMPLEX)
    assert small[0].mu["w"].dtype == jnp.complex64


# --------------------------------------------------------------------------- aliases


@pytest.mark.parametrize("name", ["nadam", "nadamw"])
def test_nadam_aliases_match_optax(name):
    ours, theirs = _run([getattr(optim, name)(1e-2), getattr(optax, name)(1e-2)], SMALL)
    _assert_trees_close(ours[2], theirs[2])
    assert jaxopt_nn.nadam is optim.nadam and jaxopt_nn.nadamw is optim.nadamw


def test_states_load_from_optax_and_back():
    for ours_tx, theirs_tx in [
        (optim.adam(1e-2), optax.adam(1e-2)),
        (optim.rmsprop(1e-2), optax.rmsprop(1e-2)),
        (optim.rmsprop(1e-2, centered=True), optax.rmsprop(1e-2, centered=True)),
    ]:
        theirs = theirs_tx.init(SMALL)
        ours = ours_tx.init(SMALL)
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        updates, _ = ours_tx.update(SMALL, theirs, SMALL)
        expected, _ = theirs_tx.update(SMALL, ours, SMALL)
        _assert_trees_close(updates, expected)


# --------------------------------------------------------------------------- nnx


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("bits", [8, 4])
def test_nnx_optimizer_with_quantized_state_traces_once_and_checkpoints(tmp_path, bits):
    from flax import serialization

    quant = optim.BlockQuantization(bits=bits, min_size=256)

    def make():
        model = nnx.Linear(64, 80, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(
            model, optim.adam(1e-2, state_quantization=quant), wrt=nnx.Param
        )

    model, optimizer = make()
    x = jnp.linspace(-1.0, 1.0, 3 * 64).reshape(3, 64)
    traces = []

    @nnx.jit
    def step(model, optimizer):
        traces.append(None)
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)

    structure = jax.tree.structure(nnx.state(optimizer))
    for _ in range(3):
        step(model, optimizer)
    assert len(traces) == 1
    assert jax.tree.structure(nnx.state(optimizer)) == structure
    kernel_mu = optimizer.opt_state[0].mu["kernel"]
    assert isinstance(kernel_mu, optim.BlockQuantizedArray)
    saved = jax.tree.map(np.asarray, nnx.state(optimizer))

    # msgpack through nnx.to_pure_dict
    blob = serialization.to_bytes(nnx.to_pure_dict(nnx.state(optimizer)))
    _, fresh = make()
    state = nnx.state(fresh)
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), blob))
    nnx.update(fresh, state)
    for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)

    # orbax
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "opt", nnx.state(optimizer))
        checkpointer.wait_until_finished()
        _, fresh = make()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh))
        nnx.update(fresh, checkpointer.restore(tmp_path / "opt", abstract))
    for a, b in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(a, b)
    step(model, fresh)  # the restored optimizer trains on
    assert jax.tree.structure(nnx.state(fresh)) == structure


# --------------------------------------------------------------------------- 4-bit


def test_4bit_codes_pack_two_per_byte_and_round_trip():
    quant = optim.BlockQuantization(bits=4, block_size=8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 17)), jnp.float32)
    q = quantize(x, "signed", quant)
    assert q.codes.shape == (3, 9) and q.scales.shape == (3, 3)
    y = np.asarray(dequantize(q, "signed", x.shape, quant))
    # (2, 1) bits: relative error <= 1/4 above the flush-to-zero threshold
    # (3/32 of the block maximum: half the smallest code 0.1875 / 1.5 * max).
    block_max = np.repeat(
        np.abs(np.pad(np.asarray(x), ((0, 0), (0, 7)))).reshape(3, 3, 8).max(-1), 8, -1
    )[:, :17]
    assert np.all(np.abs(y - x) <= np.abs(x) / 4 + block_max / 8)
    r = np.abs(x)
    v = np.asarray(dequantize(quantize(x * x, "sqrt", quant), "sqrt", x.shape, quant))
    assert np.all(v > 0)  # zero-excluding: no root rounds to zero
    assert np.all(np.abs(np.sqrt(v) - r) <= r / 4 + block_max * 2.0**-7)


def test_4bit_adam_trains_lenet_on_digits():
    from jaxopt_nn import data, train
    from jaxopt_nn.models import LeNet300100

    digits = data.load_digits()
    result = train.fit(
        LeNet300100(64, rngs=nnx.Rngs(0)),
        optim.adam(1e-3, state_quantization=optim.BlockQuantization(bits=4)),
        digits,
        epochs=10,
        batch_size=64,
        progress=False,
    )
    metrics = train.evaluate(result.graphdef, result.state, digits.x_test, digits.y_test)
    assert metrics["accuracy"] > 0.9


def _compiled_step(tx, params):
    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state = jax.eval_shape(tx.init, params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


@pytest.mark.parametrize("bits, fraction", [(8, 0.9), (4, 0.85)])
def test_quantized_adam_step_writes_only_codes_and_the_parameter(bits, fraction):
    shape = (256, 1024)
    params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
    quant = optim.BlockQuantization(bits=bits, kernel="xla")
    quantized = _compiled_step(optim.adam(1e-3, state_quantization=quant), params)
    reference = _compiled_step(optim.adam(1e-3), params)

    def bytes_accessed(compiled):
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]

    # The moments are read and written as bytes: below float32 Adam's traffic.
    assert bytes_accessed(quantized) <= fraction * bytes_accessed(reference)
    # Every array of the parameter's size, or of its codes' size, that the
    # step writes, by the instruction that writes it.
    full = f"f32[{shape[0]},{shape[1]}]"
    codes = f"u8[{shape[0]},{shape[1] if bits == 8 else shape[1] // 2}]"
    entry = quantized.as_text().split("ENTRY", 1)[1]
    written = []
    for line in entry.splitlines():
        if "=" not in line or "parameter(" in line or "get-tuple-element(" in line:
            continue
        name, rest = line.split("=", 1)
        if name.strip().startswith("ROOT"):
            continue
        rest = rest.strip()
        outputs = rest.split(")", 1)[0] if rest.startswith("(") else rest.split(" ", 1)[0]
        for size in (full, codes):
            written += [(size, " copy(" in rest)] * outputs.count(size + "{")
    # The new parameter, and each moment's codes once (4-bit: packed in the
    # loop that encodes them). No decoded or new moment goes through memory;
    # the old codes, read by the parameter's loop and the encoding loop,
    # which XLA does not order, are copied first (a byte per element).
    assert sorted(written) == sorted(
        [(full, False), (codes, False), (codes, False), (codes, True), (codes, True)]
    ), written
