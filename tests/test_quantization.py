"""Tests of uniform quantization, fake-quant (STE), k-means weight sharing, bit packing."""

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_nn import data, models, train
from jaxopt_nn.quantization import (
    Codebook,
    QuantizedArray,
    centroid_params,
    codebook_weights,
    dequantize,
    dequantize_tree,
    fake_quant,
    fake_quant_tree,
    kmeans_codebook,
    kmeans_tree,
    pack_bits,
    packed_size,
    quantize,
    quantize_tree,
    share_weights,
    unpack_bits,
    update_codebooks,
)

EPS32 = float(np.finfo(np.float32).eps)


def _reconstruction_bound(x, q):
    """scale / 2 per element, plus float32 rounding of x / scale and of the product."""
    scale = np.broadcast_to(np.asarray(q.scale, np.float64), x.shape)
    return 0.5 * scale + 8 * EPS32 * np.max(np.abs(x), initial=0.0)


# XLA on CPU flushes denormals to zero, so magnitudes below 1e-6 are snapped to 0.
_finite = st.floats(-1e3, 1e3, width=32, allow_subnormal=False).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v
)


@st.composite
def _quant_case(draw):
    x = draw(
        hnp.arrays(
            np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), elements=_finite
        )
    )
    symmetric = draw(st.booleans())
    bits = draw(st.integers(2 if symmetric else 1, 16))
    axis = draw(st.one_of(st.none(), st.integers(-x.ndim, x.ndim - 1)))
    return x, bits, axis, symmetric


# --------------------------------------------------------------------------- uniform


@settings(max_examples=25, deadline=None)
@given(_quant_case())
def test_quantize_error_is_at_most_half_a_step(case):
    x, bits, axis, symmetric = case
    q = quantize(x, bits, axis=axis, symmetric=symmetric)
    restored = np.asarray(dequantize(q), np.float64)
    err = np.abs(restored - x)
    assert np.all(err <= _reconstruction_bound(x, q)), (err.max(), q.scale)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    codes = np.asarray(q.codes, np.int64)
    assert codes.min() >= qmin and codes.max() <= qmax
    np.testing.assert_array_equal(restored[x == 0], 0.0)  # zero is exact


@pytest.mark.parametrize(
    ("bits", "symmetric", "dtype"),
    [
        (1, False, np.uint8),
        (8, False, np.uint8),
        (9, False, np.uint16),
        (16, False, np.uint16),
        (2, True, np.int8),
        (8, True, np.int8),
        (9, True, np.int16),
        (16, True, np.int16),
    ],
)
def test_codes_use_the_smallest_integer_dtype(bits, symmetric, dtype):
    q = quantize(jnp.linspace(-1.0, 1.0, 7), bits, symmetric=symmetric)
    assert q.codes.dtype == dtype
    assert q.bits == bits


def test_per_channel_scale_follows_each_channel_range(getkey):
    x = jax.random.normal(getkey(), (5, 3)) * jnp.array([0.01, 1.0, 100.0])[None, :]
    q = quantize(x, 4, axis=-1)
    assert q.scale.shape == (1, 3)
    lo = np.minimum(np.asarray(x).min(axis=0), 0.0)
    hi = np.maximum(np.asarray(x).max(axis=0), 0.0)
    np.testing.assert_allclose(np.asarray(q.scale)[0], (hi - lo) / 15, rtol=1e-6)
    assert quantize(x, 4).scale.shape == ()


def test_matches_the_classic_floor_formula_up_to_one_code(getkey):
    w = np.asarray(jax.random.normal(getkey(), (64, 32)))
    bits = 5
    q = quantize(w, bits)
    step = (w.max() - w.min()) / (2**bits - 1)
    np.testing.assert_allclose(float(q.scale), step, rtol=1e-6)
    classic = np.floor((w - w.min()) / (w.max() - w.min()) * (2**bits - 1))
    assert np.max(np.abs(np.asarray(q.codes, np.int64) - classic)) <= 1
    classic_err = np.abs(classic * step + w.min() - w).max()
    ours_err = np.abs(np.asarray(dequantize(q)) - w).max()
    assert ours_err <= step / 2 * (1 + 1e-5) < classic_err


@pytest.mark.parametrize("value", [3.5, -2.0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_constant_tensor_is_restored_without_nan(value, symmetric):
    x = jnp.full((4, 3), value)
    q = quantize(x, 4, symmetric=symmetric)
    assert np.isfinite(float(q.scale))
    np.testing.assert_allclose(dequantize(q), x, rtol=1e-6)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_tensor_has_zero_scale_and_exact_zeros(axis, symmetric):
    q = quantize(jnp.zeros((3, 2)), 3, axis=axis, symmetric=symmetric)
    np.testing.assert_array_equal(q.scale, 0.0)
    np.testing.assert_array_equal(q.codes, 0)
    restored = dequantize(q)
    assert restored.shape == (3, 2)
    np.testing.assert_array_equal(restored, 0.0)


def test_single_element_and_empty_arrays():
    np.testing.assert_allclose(dequantize(quantize(jnp.array([0.7]), 2)), [0.7], rtol=1e-6)
    q = quantize(jnp.zeros((0, 3)), 4, axis=1)
    assert q.codes.shape == (0, 3) and q.scale.shape == (1, 3)
    assert dequantize(q).shape == (0, 3)


def test_quantized_array_bits_is_static_metadata():
    q = quantize(jnp.linspace(-1.0, 1.0, 5), 3)
    assert len(jax.tree.leaves(q)) == 3
    doubled = jax.tree.map(lambda a: a * 2, q)
    assert doubled.bits == 3
    jitted = jax.jit(functools.partial(quantize, bits=3))(jnp.linspace(-1.0, 1.0, 5))
    assert isinstance(jitted, QuantizedArray) and jitted.bits == 3
    np.testing.assert_array_equal(jitted.codes, q.codes)
    np.testing.assert_array_equal(jax.jit(dequantize)(q), dequantize(q))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dequantize_returns_the_quantized_dtype_unless_asked(dtype):
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4), "b": jnp.ones(4, dtype)}
    q = quantize_tree(params, 4, axis=-1)
    assert q["w"].dtype == np.dtype(dtype)
    restored = dequantize_tree(q)
    assert jax.tree.map(lambda a: a.dtype, restored) == jax.tree.map(lambda a: a.dtype, params)
    assert dequantize(q["w"], jnp.float32).dtype == jnp.float32
    assert jax.jit(dequantize)(q["w"]).dtype == dtype


def test_quantize_tree_on_nnx_state_only_touches_selected_leaves():
    model = models.LeNet300100(16, 4, hidden=(8, 6), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    q = quantize_tree(params, 8, axis=-1)
    assert isinstance(q["fc1"]["kernel"].get_value(), QuantizedArray)
    np.testing.assert_array_equal(q["fc1"]["bias"].get_value(), params["fc1"]["bias"].get_value())
    restored = dequantize_tree(q)
    for name in ("fc1", "fc2", "fc3"):
        expected = dequantize(quantize(params[name]["kernel"].get_value(), 8, axis=-1))
        np.testing.assert_array_equal(restored[name]["kernel"].get_value(), expected)
    tree = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    untouched = quantize_tree(tree, 4, where=lambda name, leaf: False)
    assert jax.tree.structure(untouched) == jax.tree.structure(tree)


def test_nan_check_applies_to_concrete_inputs_only():
    x = jnp.array([1.0, jnp.nan])
    with pytest.raises(ValueError, match="x must be finite"):
        quantize(x, 4)
    codes = jax.jit(lambda v: quantize(v, 4).codes)(x)  # not checked under jit
    assert codes.shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 0}, ValueError, r"bits must lie in \[1, 16\]; got bits=0"),
        ({"bits": 17}, ValueError, r"bits must lie in \[1, 16\]; got bits=17"),
        ({"bits": 4.0}, TypeError, "bits must be a Python int"),
        ({"bits": True}, TypeError, "bits must be a Python int"),
        ({"bits": 1, "symmetric": True}, ValueError, "when symmetric=True"),
        ({"bits": 4, "axis": 2}, ValueError, "axis must be None or int"),
        ({"bits": 4, "axis": (0, -2)}, ValueError, "must not repeat"),
    ],
)
def test_quantize_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(jnp.ones((2, 3)), **kwargs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_inputs_raise(bad, dtype):
    x = jnp.array([[0.5, bad]], dtype)
    for fn in (quantize, fake_quant, kmeans_codebook):
        with pytest.raises(ValueError, match="must be finite"):
            fn(x, 4)


def test_integer_input_raises():
    for fn in (quantize, fake_quant, kmeans_codebook):
        with pytest.raises(TypeError, match="floating-point"):
            fn(jnp.arange(4), 4)


# --------------------------------------------------------------------------- fake quant / STE


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("axis", [None, 0])
def test_fake_quant_forward_equals_quantize_dequantize(getkey, symmetric, axis):
    x = jax.random.normal(getkey(), (6, 4))
    expected = dequantize(quantize(x, 5, axis=axis, symmetric=symmetric))
    np.testing.assert_array_equal(fake_quant(x, 5, axis=axis, symmetric=symmetric), expected)
    grad = jax.grad(lambda v: fake_quant(v, 5, axis=axis, symmetric=symmetric).sum())(x)
    np.testing.assert_array_equal(grad, np.ones(x.shape))  # data range: everything inside


@pytest.mark.parametrize("symmetric", [False, True])
def test_ste_gradient_is_cotangent_times_clip_mask(getkey, symmetric):
    x = 2 * jax.random.normal(getkey(), (50,))
    g = jax.random.normal(getkey(), (50,))
    lower, upper = -0.8, 1.5
    _, vjp = jax.vjp(lambda v: fake_quant(v, 4, symmetric=symmetric, clip=(lower, upper)), x)
    if symmetric:
        lower, upper = -1.5, 1.5
    inside = (np.asarray(x) >= lower) & (np.asarray(x) <= upper)
    assert 0 < inside.sum() < x.size
    np.testing.assert_array_equal(vjp(g)[0], np.where(inside, g, 0.0))
    out = np.asarray(fake_quant(x, 4, symmetric=symmetric, clip=(lower, upper)))
    step = (upper - lower) / (14 if symmetric else 15)
    assert out.min() >= lower - step / 2 - 1e-6 and out.max() <= upper + step / 2 + 1e-6


def test_fake_quant_clip_must_contain_zero():
    with pytest.raises(ValueError, match="lower <= 0 <= upper"):
        fake_quant(jnp.ones(3), 4, clip=(0.5, 1.0))


def test_fake_quant_tree_matches_quantize_tree_and_skips_unselected():
    params = {"w": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4), "b": jnp.linspace(0.0, 1.0, 4)}
    fq = fake_quant_tree(params, 3, axis=-1)
    np.testing.assert_array_equal(fq["b"], params["b"])
    np.testing.assert_array_equal(fq["w"], dequantize_tree(quantize_tree(params, 3, axis=-1))["w"])
    grads = jax.grad(lambda p: sum(jnp.sum(v) for v in jax.tree.leaves(fake_quant_tree(p, 3))))(
        params
    )
    np.testing.assert_array_equal(grads["w"], np.ones((3, 4)))


# --------------------------------------------------------------------------- k-means


def _lloyd_reference(values, centroids, iters):
    """Plain numpy Lloyd iterations (nearest centroid, empty clusters keep their value)."""
    c = np.sort(np.asarray(centroids, np.float64))
    for _ in range(iters):
        members = np.argmin(np.abs(values[:, None] - c[None, :]), axis=1)
        new = c.copy()
        for j in range(c.size):
            if np.any(members == j):
                new[j] = values[members == j].mean()
        c = np.sort(new)
    return c


def test_kmeans_linear_init_and_lloyd_match_numpy(getkey):
    w = np.array(jax.random.laplace(getkey(), (40, 30)), np.float32)
    w[np.abs(w) < 0.3] = 0.0  # pruned
    kept = w[w != 0].astype(np.float64)
    init = kmeans_codebook(w, 3, iters=0)
    np.testing.assert_allclose(init.centroids, np.linspace(kept.min(), kept.max(), 8), rtol=1e-6)
    book = kmeans_codebook(w, 3, iters=5)
    expected = _lloyd_reference(kept, np.linspace(kept.min(), kept.max(), 8), 5)
    np.testing.assert_allclose(book.centroids, expected, rtol=1e-5, atol=1e-6)


def test_kmeans_indices_are_nearest_centroids_of_kept_weights(getkey):
    w = jax.random.normal(getkey(), (20, 10))
    mask = jax.random.bernoulli(getkey(), 0.6, w.shape)
    book = kmeans_codebook(w, 4, mask=mask, iters=50)
    assert book.indices.dtype == np.uint8 and book.indices.shape == w.shape
    np.testing.assert_array_equal(book.mask, mask)
    assert np.all(np.diff(np.asarray(book.centroids)) >= 0)
    np.testing.assert_array_equal(np.asarray(book.indices)[~np.asarray(mask)], 0)
    kept = np.asarray(w)[np.asarray(mask)]
    distance = np.abs(kept[:, None] - np.asarray(book.centroids)[None, :])
    chosen = distance[np.arange(kept.size), np.asarray(book.indices)[np.asarray(mask)]]
    np.testing.assert_allclose(chosen, distance.min(axis=1), atol=1e-6)
    rebuilt = np.asarray(codebook_weights(book))
    np.testing.assert_array_equal(rebuilt[~np.asarray(mask)], 0.0)


@pytest.mark.parametrize("init", ["density", "random"])
def test_kmeans_other_inits_start_from_kept_weights(getkey, init):
    w = jax.random.normal(getkey(), (300,))
    key = jax.random.key(3)
    book = kmeans_codebook(w, 3, init=init, iters=0, key=key)
    assert np.all(np.isin(np.asarray(book.centroids), np.asarray(w)))
    if init == "density":
        ordered = np.sort(np.asarray(w))
        np.testing.assert_array_equal(
            book.centroids, ordered[np.round(np.linspace(0, 299, 8)).astype(int)]
        )
    else:
        again = kmeans_codebook(w, 3, init=init, iters=0, key=key)
        np.testing.assert_array_equal(book.centroids, again.centroids)


@pytest.mark.parametrize("shape", [(4, 4), (0, 3)])
def test_kmeans_with_nothing_kept_gives_zero_centroids(shape):
    book = kmeans_codebook(jnp.zeros(shape), 2)
    np.testing.assert_array_equal(book.centroids, np.zeros(4))
    assert book.indices.shape == shape and not np.asarray(book.mask).any()
    np.testing.assert_array_equal(codebook_weights(book), np.zeros(shape))


def test_kmeans_uses_uint16_indices_above_8_bits():
    book = kmeans_codebook(jnp.linspace(-1.0, 1.0, 50), 9, iters=2)
    assert book.indices.dtype == np.uint16 and book.centroids.shape == (512,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"init": "kmeans++"}, "init must be one of"),
        ({"iters": -1}, "iters must be an int >= 0"),
        ({"mask": jnp.ones((3,), bool)}, "mask must have the shape of x"),
        ({"init": "random"}, "key must be a jax.random.key"),
        ({"bits": 17}, r"bits must lie in \[1, 16\]"),
    ],
)
def test_kmeans_rejects_bad_arguments(kwargs, match):
    kwargs = {"bits": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        kmeans_codebook(jnp.ones((2, 2)), **kwargs)


def test_kmeans_tree_bits_per_leaf_and_masks_by_name():
    params = {"a": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}, "b": jnp.ones((2, 2))}
    mask = jnp.arange(12).reshape(3, 4) % 2 == 0
    books = kmeans_tree(params, {"a/kernel": 2, "b": 1}, masks={"a": {"kernel": mask}})
    assert list(books) == ["a/kernel", "b"]
    assert books["a/kernel"].centroids.shape == (4,) and books["b"].centroids.shape == (2,)
    np.testing.assert_array_equal(books["a/kernel"].mask, mask)
    assert kmeans_tree(params, 2, where=lambda name, leaf: False) == {}
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        kmeans_tree(params, {"a/kernel": 2})
    with pytest.raises(ValueError, match=r"not selected \['typo/kernel'\]"):
        kmeans_tree(params, {"a/kernel": 2, "b": 1, "typo/kernel": 3})
    with pytest.raises(ValueError, match="key must be"):
        kmeans_tree(params, 2, init="random")


# --------------------------------------------------------------------------- centroid fine-tuning


def test_centroid_gradient_is_segment_sum_of_member_gradients(getkey):
    w = jax.random.normal(getkey(), (12, 8))
    mask = jax.random.bernoulli(getkey(), 0.7, w.shape)
    book = kmeans_codebook(w, 3, mask=mask)
    params = {"w": w, "b": jnp.zeros(8)}
    trainable, rebuild = centroid_params(params, {"w": book})
    upstream = jax.random.normal(getkey(), w.shape)
    grads = jax.grad(lambda t: jnp.sum(rebuild(t)["w"] * upstream))(trainable)
    expected = jax.ops.segment_sum(
        jnp.where(mask, upstream, 0).ravel(), book.indices.astype(jnp.int32).ravel(), 8
    )
    np.testing.assert_allclose(grads["w"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rebuild(trainable)["w"], codebook_weights(book))
    np.testing.assert_array_equal(share_weights(params, {"w": book})["w"], codebook_weights(book))


def test_share_weights_and_update_codebooks_reject_mismatches():
    params = {"w": jnp.ones((2, 3))}
    book = kmeans_codebook(jnp.ones((3, 2)), 1)
    with pytest.raises(ValueError, match="has indices of shape"):
        share_weights(params, {"w": book})
    with pytest.raises(ValueError, match="params lack"):
        centroid_params(params, {"v": book})
    with pytest.raises(ValueError, match="must hold centroids of shape"):
        update_codebooks({"w": book}, {"w": jnp.ones(3)})


# --------------------------------------------------------------------------- bit packing


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=40))
    )
)
def test_pack_round_trip_and_layout(case):
    bits, codes = case
    buf = pack_bits(np.asarray(codes, np.int64), bits)
    assert buf.dtype == np.uint8 and buf.size == math.ceil(len(codes) * bits / 8)
    assert buf.size == packed_size(len(codes), bits)
    stream = "".join(format(c, f"0{bits}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    expected = [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]
    np.testing.assert_array_equal(buf, np.asarray(expected, np.uint8))
    np.testing.assert_array_equal(unpack_bits(buf, bits, len(codes)), np.asarray(codes, np.uint8))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_every_width_of_quantized_codes(getkey, bits):
    q = quantize(jax.random.normal(getkey(), (33, 7)), bits)
    buf = pack_bits(q.codes, bits)
    restored = unpack_bits(buf.tobytes(), bits, q.codes.size).reshape(q.codes.shape)
    np.testing.assert_array_equal(restored, q.codes)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: pack_bits([4], 2), ValueError, r"codes must lie in \[0, 3\]"),
        (lambda: pack_bits([-1], 2), ValueError, r"codes must lie in \[0, 3\]"),
        (lambda: pack_bits([1.0], 2), TypeError, "codes must be integers"),
        (lambda: pack_bits([1], 9), ValueError, r"bits must lie in \[1, 8\]"),
        (lambda: unpack_bits(np.zeros(2, np.uint8), 3, 6), ValueError, "must hold ceil"),
        (lambda: unpack_bits(np.zeros(2, np.uint8), 3, -1), ValueError, "count must be >= 0"),
        (lambda: unpack_bits(np.zeros(2, np.uint8), 3, 1.5), TypeError, "count must be an int"),
        (lambda: unpack_bits(np.zeros(2, np.int32), 8, 2), ValueError, "buf must be 1-D uint8"),
    ],
)
def test_packing_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- trained LeNet


@pytest.fixture(scope="module")
def digits():
    return data.load_digits()


@pytest.fixture(scope="module")
def trained(digits):
    model = models.LeNet300100(64, rngs=nnx.Rngs(0))
    return train.fit(model, optax.adam(1e-3), digits, epochs=20, progress=False)


def test_qat_at_4_bits_stays_within_one_point_of_float(digits, trained):
    qat = functools.partial(fake_quant_tree, bits=4)
    result = train.fit(
        models.LeNet300100(64, rngs=nnx.Rngs(0)),
        optax.adam(1e-3),
        digits,
        epochs=20,
        progress=False,
        param_transform=qat,
    )
    float_acc = trained.history[-1]["test_accuracy"]
    qat_acc = result.history[-1]["test_accuracy"]
    assert qat_acc >= float_acc - 0.01, (qat_acc, float_acc)
    stored = lambda p: dequantize_tree(quantize_tree(p, 4))  # noqa: E731
    deployed = train.evaluate(
        result.graphdef, result.state, digits.x_test, digits.y_test, param_transform=stored
    )
    np.testing.assert_allclose(deployed["accuracy"], qat_acc, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_kmeans_beats_uniform_mse_on_a_trained_layer(trained, bits):
    w = trained.state.params["fc2"]["kernel"].get_value()
    uniform = float(jnp.mean((dequantize(quantize(w, bits)) - w) ** 2))
    shared = float(jnp.mean((codebook_weights(kmeans_codebook(w, bits)) - w) ** 2))
    assert shared < uniform, (shared, uniform)


def test_centroid_fine_tuning_lowers_loss_and_keeps_shared_and_pruned(digits, trained):
    params = trained.state.params
    masks = jax.tree.map(lambda w: jnp.abs(w) >= jnp.quantile(jnp.abs(w), 0.8), params)
    books = kmeans_tree(params, 2, masks=masks)
    tx = optax.adam(1e-3)
    trainable, rebuild = centroid_params(params, books)
    state = train.TrainState(trainable, trained.state.rest, tx.init(trainable))
    step = train.make_train_step(trained.graphdef, tx, param_transform=rebuild, donate=False)
    x, y = digits.x_train, digits.y_train
    before = train.evaluate(trained.graphdef, state, x, y, param_transform=rebuild)["loss"]
    for epoch in range(3):
        for xb, yb in data.batches(x, y, 128, seed=epoch, drop_remainder=True):
            state, _ = step(state, xb, yb)
    after = train.evaluate(trained.graphdef, state, x, y, param_transform=rebuild)["loss"]
    assert after < before, (after, before)
    tuned = update_codebooks(books, state.params)
    dense = rebuild(state.params)
    for name, book in tuned.items():
        layer = name.split("/")[0]
        weights = np.asarray(dense[layer]["kernel"].get_value())
        mask = np.asarray(book.mask)
        np.testing.assert_array_equal(weights[~mask], 0.0)
        assert np.all(np.isin(weights[mask], np.asarray(book.centroids)))
        assert not np.allclose(book.centroids, books[name].centroids)
        np.testing.assert_array_equal(weights, codebook_weights(book))
    assert isinstance(next(iter(tuned.values())), Codebook)
