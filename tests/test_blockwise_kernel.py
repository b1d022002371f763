"""The fused CPU kernel of the quantized optimizer step against the XLA path.

The kernel must give the XLA path's state: the same codes and scales. jax
0.12's XLA rounds exactly as the kernel does; jax 0.10's XLA reassociates the
8-bit first-moment bound ``b1 * (scale * largest)`` into ``(b1 * largest) *
scale`` when ``b1`` is a constant, so a scale there may differ in its last
bit, and a code next to a rounding tie by one step. The updates may differ
in the last bit (bias corrections applied as reciprocals, exact ``1 /
sqrt``). The tolerances below allow exactly that.
"""

import functools
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from jaxopt_nn import _kernels, optim
from jaxopt_nn._blockwise import fused_step, quantize, uses_kernel

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the fused kernel runs on the CPU backend"
)


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    """Build (or load) the kernel once; skip the module where no compiler works."""
    try:
        _kernels.require()
    except _kernels.KernelUnavailableError as error:
        pytest.skip(f"kernel unavailable: {error}")


def _unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.asarray(codes)
    if bits == 8:
        return codes.astype(np.int32)
    return np.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)


def _assert_same_state(kernel_state, xla_state, bits):
    kernel_leaves = jax.tree.leaves(kernel_state)
    xla_leaves = jax.tree.leaves(xla_state)
    assert len(kernel_leaves) == len(xla_leaves)
    for a, b in zip(kernel_leaves, xla_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.dtype == np.uint8:
            ka, kb = _unpack(a, bits), _unpack(b, bits)
            different = ka != kb
            # Only next to a rounding tie, by one step of the magnitude.
            assert different.mean() <= 0.01, f"{different.sum()} of {different.size} codes"
            np.testing.assert_array_less(np.abs(ka - kb)[different] % (2 ** (bits - 1)), 2)
        elif np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
        else:
            np.testing.assert_array_equal(a, b)


def _assert_close_updates(a, b):
    """Within float32 rounding of the update's scale (a last-bit difference may cancel)."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-6 * float(np.max(np.abs(b), initial=0)))


def _run(make_tx, params, grads_per_step, kernel, bits, block_size=None, min_size=1):
    quant = optim.BlockQuantization(
        bits=bits, block_size=block_size, min_size=min_size, kernel=kernel
    )
    tx = make_tx(quant)
    state = tx.init(params)
    update = jax.jit(tx.update)
    updates = []
    for grads in grads_per_step:
        u, state = update(grads, state, params)
        updates.append(u)
    return updates, state


def _grads(params, steps):
    """Gradients over several orders of magnitude, with exact zeros and sign changes."""
    return [
        jax.tree.map(
            lambda p, t=t: (
                jnp.where(jnp.abs(p) < 0.05, 0.0, jnp.sin(p * (3.0 + t))) * 10.0 ** (t - 1)
            ),
            params,
        )
        for t in range(steps)
    ]


_OPTIMIZERS = {
    "adam": lambda q: optim.adam(1e-2, state_quantization=q),
    "nadamw": lambda q: optim.nadamw(1e-2, weight_decay=0.1, state_quantization=q),
    "rmsprop": lambda q: optim.rmsprop(1e-2, state_quantization=q),
    "rmsprop_torch": lambda q: optim.rmsprop(
        1e-2, eps_in_sqrt=False, bias_correction=True, initial_scale=0.5, state_quantization=q
    ),
}

_shapes = st.one_of(
    st.tuples(st.integers(1, 70)),
    st.tuples(st.integers(1, 6), st.integers(1, 70)),
    st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 33)),
)


@settings(max_examples=6, deadline=None)
@given(
    shape=_shapes,
    bits=st.sampled_from([8, 4]),
    block_size=st.sampled_from([None, 8, 6]),
    name=st.sampled_from(sorted(_OPTIMIZERS)),
)
def test_kernel_gives_the_xla_paths_state_and_updates(shape, bits, block_size, name):
    params = {
        "w": jax.random.normal(jax.random.key(0), shape),
        "b": jnp.ones((3,)),  # stays in float: below min_size
    }
    grads = _grads(params, 3)
    make_tx = _OPTIMIZERS[name]
    kernel = _run(make_tx, params, grads, "cpu", bits, block_size, min_size=4)
    xla = _run(make_tx, params, grads, "xla", bits, block_size, min_size=4)
    if np.prod(shape) >= 4:
        assert isinstance(kernel[1][0].nu["w"], optim.BlockQuantizedArray)
    _assert_same_state(kernel[1], xla[1], bits)
    for a, b in zip(jax.tree.leaves(kernel[0]), jax.tree.leaves(xla[0]), strict=True):
        _assert_close_updates(a, b)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_state_updates_in_place_without_copies(bits):
    params = {"w": jax.ShapeDtypeStruct((64, 512), jnp.float32)}
    tx = optim.adam(1e-3, state_quantization=optim.BlockQuantization(bits=bits, kernel="cpu"))

    def step(p, s, x):
        # The gradient is computed in the step, as in training, so it is dead
        # after the update and the kernel writes the update over it.
        g = jax.tree.map(lambda w: jnp.tanh(w * x), p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    state = jax.eval_shape(tx.init, params)
    text = (
        jax.jit(step, donate_argnums=(0, 1))
        .lower(params, state, jax.ShapeDtypeStruct((), jnp.float32))
        .compile()
        .as_text()
    )
    entry = text.split("ENTRY", 1)[1]
    assert entry.count("custom-call(") == 1
    assert " copy(" not in entry, entry


def test_kernel_under_vmap_over_states_and_over_hyperparameters():
    params = jax.random.normal(jax.random.key(1), (4, 40))
    grads = jnp.stack([jnp.sin(params * k) for k in range(1, 4)])

    def per_batch(kernel):
        tx = optim.adam(1e-2, state_quantization=optim.BlockQuantization(min_size=1, kernel=kernel))
        state = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
        return jax.jit(jax.vmap(tx.update))(grads, state)

    def per_b1(kernel):
        quant = optim.BlockQuantization(bits=4, block_size=8, min_size=1, kernel=kernel)

        def one(b1):
            tx = optax.inject_hyperparams(optim.adam)(0.1, b1=b1, state_quantization=quant)
            return tx.update(grads[0], tx.init(params))

        return jax.jit(jax.vmap(one))(jnp.array([0.0, 0.5, 0.9]))

    for run in (per_batch, per_b1):
        (u_kernel, s_kernel), (u_xla, s_xla) = run("cpu"), run("xla")
        _assert_same_state(s_kernel, s_xla, 8 if run is per_batch else 4)
        _assert_close_updates(u_kernel, u_xla)


def test_kernel_with_traced_learning_rate_and_decays_in_a_chain():
    params = {"w": jax.random.normal(jax.random.key(2), (8, 300))}
    grads = _grads(params, 3)

    def make(quant):
        return optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.inject_hyperparams(optim.adamw)(
                learning_rate=optax.linear_schedule(1e-2, 1e-3, 3),
                b1=0.8,
                b2=0.95,
                state_quantization=quant,
            ),
        )

    kernel = _run(make, params, grads, "cpu", 8)
    xla = _run(make, params, grads, "xla", 8)
    _assert_same_state(kernel[1], xla[1], 8)
    for a, b in zip(kernel[0], xla[0], strict=True):
        _assert_close_updates(a["w"], b["w"])


def test_which_path_runs():
    g = jnp.ones((4, 8))
    cpu = optim.BlockQuantization(kernel="cpu")
    assert uses_kernel(cpu, g)
    assert not uses_kernel(cpu, g.astype(jnp.bfloat16))  # float32 gradients only
    assert not uses_kernel(optim.BlockQuantization(kernel="xla"), g)
    # 'auto' keeps the XLA path where several devices are visible (the test
    # session has two): the kernel has no sharding rule.
    assert jax.device_count() > 1
    assert not uses_kernel(optim.BlockQuantization(), g)
    sharded = jax.device_put(
        jnp.ones((4, 8)),
        jax.sharding.NamedSharding(
            jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",)),
            jax.sharding.PartitionSpec("x"),
        ),
    )
    assert not uses_kernel(cpu, sharded)


def test_bad_kernel_name_raises():
    with pytest.raises(
        ValueError, match=r"kernel must be 'auto', 'xla' or 'cpu'; got kernel='gpu'"
    ):
        optim.BlockQuantization(kernel="gpu")  # pyright: ignore[reportArgumentType]


def test_corrupt_cached_library_is_rebuilt(tmp_path, monkeypatch):
    good = _kernels.library_path()
    monkeypatch.setenv("JAXOPT_NN_CACHE_DIR", str(tmp_path))
    path = _kernels.library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a shared library")
    builds = []

    def build(compiler, target):
        builds.append(target)
        shutil.copy(good, target)  # stands in for the compiler

    monkeypatch.setattr(_kernels, "_build", build)
    assert _kernels.open_library() is not None
    assert builds == [path]
    # Now cached: opened again without a build.
    _kernels.open_library()
    assert builds == [path]


def test_corrupt_cached_library_that_cannot_be_rebuilt_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXOPT_NN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    path = _kernels.library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF truncated")
    with pytest.raises(_kernels.KernelUnavailableError, match="no C\\+\\+ compiler found"):
        _kernels.open_library()


_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxopt_nn import _kernels, optim
    params = jax.random.normal(jax.random.key(0), (16, 300))
    results = {}
    for kernel in ("auto", "xla"):
        quant = optim.BlockQuantization(kernel=kernel, min_size=1)
        tx = optim.adam(1e-2, state_quantization=quant)
        updates, _ = jax.jit(tx.update)(jnp.sin(params), tx.init(params))
        results[kernel] = np.asarray(updates)
    np.testing.assert_allclose(results["auto"], results["xla"], rtol=2e-6)
    print("available", _kernels.available())
    tx = optim.adam(1e-2, state_quantization=optim.BlockQuantization(kernel="cpu", min_size=1))
    try:
        tx.update(params, tx.init(params))
    except _kernels.KernelUnavailableError as error:
        print("cpu raises", type(error).__name__)
    # The library this test session built, under the name this process computes.
    os.environ["JAXOPT_NN_CACHE_DIR"] = sys.argv[1]
    print("reused", _kernels.open_library() is not None)
    """
)


def test_no_compiler_falls_back_and_a_second_process_reuses_the_cache(tmp_path):
    cached = tmp_path / "cached"
    cached.mkdir()
    shutil.copy(_kernels.library_path(), cached / _kernels.library_path().name)
    env = dict(
        os.environ,
        JAXOPT_NN_CACHE_DIR=str(tmp_path / "empty"),
        CXX=str(tmp_path / "bin" / "no-such-c++"),
    )
    env.pop("XLA_FLAGS", None)  # one CPU device: 'auto' would take the kernel
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(cached)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.split("\n")
    # No compiler and an empty cache: 'auto' falls back to the XLA path (same
    # updates), kernel='cpu' raises; the cached library loads without one.
    assert "available False" in out
    assert "cpu raises KernelUnavailableError" in out
    assert "reused True" in out


@pytest.mark.parametrize("bits", [8, 4])
def test_gradient_passed_to_update_is_unchanged_after_it(bits):
    # The kernel writes the update over the gradient's buffer; XLA must copy
    # a gradient the caller still holds, eagerly, under jit and inside a jit
    # that returns it.
    tx = optim.adam(1e-2, state_quantization=optim.BlockQuantization(bits=bits, kernel="cpu"))
    params = jax.random.normal(jax.random.key(3), (16, 300))
    state = tx.init(params)
    g = jnp.sin(3.0 * params)
    expected = np.array(g)

    def step(p, s):
        grad = jnp.sin(3.0 * p)
        updates, s = tx.update(grad, s, p)
        return updates, grad

    for update in (tx.update, jax.jit(tx.update)):
        updates, _ = update(g, state, params)
        np.testing.assert_array_equal(np.asarray(g), expected)
        assert not np.array_equal(np.asarray(updates), expected)
    updates, grad = jax.jit(step)(params, state)
    np.testing.assert_array_equal(np.asarray(grad), expected)
    assert not np.array_equal(np.asarray(updates), expected)


@pytest.mark.parametrize(
    ("make", "decay"),
    [
        (optim.adam, "b1"),
        (functools.partial(optim.rmsprop, eps_in_sqrt=False, bias_correction=True), "decay"),
    ],
)
def test_kernel_step_is_differentiated_as_the_xla_path(make, decay):
    # The FFI call has no derivative; under jax.grad the step takes the XLA
    # path, with respect to the gradient (here a function of the parameters)
    # and to a traced hyperparameter, from a state one step in.
    params = jax.random.normal(jax.random.key(4), (8, 64))

    def loss(p, value, state, tx):
        hyperparams = {**state.hyperparams, decay: value}
        updates, _ = tx.update(jnp.cos(p), state._replace(hyperparams=hyperparams), p)
        return jnp.sum(updates**2)

    def transform(kernel):
        quant = optim.BlockQuantization(bits=4, block_size=16, min_size=1, kernel=kernel)
        return optax.inject_hyperparams(make)(1e-2, state_quantization=quant)

    xla = transform("xla")
    _, state = xla.update(jnp.sin(params), xla.init(params), params)
    grads = {}
    for kernel in ("cpu", "xla"):
        tx = transform(kernel)
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
        grads[kernel] = grad(params, jnp.float32(0.9), state, tx)
        # Without differentiation the kernel still runs.
        lowered = jax.jit(tx.update).lower(params, state, params).as_text()
        assert ("jaxopt_nn_blockwise" in lowered) == (kernel == "cpu")
    assert float(grads["xla"][1]) != 0.0
    for a, b in zip(grads["cpu"], grads["xla"], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_threads_that_need_the_kernel_at_once_build_and_register_it_once(monkeypatch):
    library = _kernels.open_library()
    opened, registered = [], []

    def open_library():
        opened.append(threading.get_ident())
        time.sleep(0.05)  # a build: the other threads arrive meanwhile
        return library

    monkeypatch.setattr(_kernels, "open_library", open_library)
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *args, **kw: registered.append(args))
    # This process registered the targets already; forget that for the test
    # (the cache is filled again below, so nothing registers twice for real).
    _kernels._register_once.cache_clear()
    threads = [threading.Thread(target=_kernels.require) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(opened) == 1
    assert len(registered) == 2  # Adam and RMSprop


def test_kernel_refuses_moments_with_fewer_rows_than_the_gradient():
    # The kernel reads and writes every row of each moment: a state that
    # does not match the gradient must be an error, not an access past the
    # end of a buffer.
    quant = optim.BlockQuantization(block_size=8, min_size=1, kernel="cpu")
    g = jnp.ones((4, 16))
    m = quantize(jnp.zeros((4, 16)), "signed", quant)
    v = quantize(jnp.zeros((4, 16)), "sqrt", quant)
    hyper = jnp.full((9,), 0.5, jnp.float32)
    update, _ = fused_step(g, [m, v], hyper, quant, "adam")
    assert update.shape == g.shape

    def rows(q):
        return optim.BlockQuantizedArray(q.codes[:2], q.scales[:2])

    for short in ([m, rows(v)], [rows(m), v]):
        with pytest.raises(
            jax.errors.JaxRuntimeError, match="codes or scales do not match the gradient's shape"
        ):
            jax.block_until_ready(fused_step(g, short, hyper, quant, "adam"))
