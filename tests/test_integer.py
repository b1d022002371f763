"""Tests for jaxopt_nn.integer: int8 layers, conversion, calibration, QAT twin, BN folding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxopt_nn import archive, integer
from jaxopt_nn.integer import (
    FakeQuant,
    Identity,
    Im2colConv,
    Int8Conv,
    Int8Linear,
    _conv,
    _patch_conv,
    _to_int8,
    calibrate,
    fold_batchnorm,
    int8_plan,
    quantize_weight,
    to_int8,
    to_qat,
)
from jaxopt_nn.models import LeNet5, LeNet300100, ResidualBlock
from jaxopt_nn.quantization import quantize

_apply = nnx.jit(lambda model, x: model(x))


def _small_lenet5():
    return LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def images():
    return jax.random.uniform(jax.random.key(1), (6, 8, 8, 1))


def test_quantize_weight_matches_symmetric_per_channel_quantize():
    w = jax.random.normal(jax.random.key(0), (3, 3, 4, 5))
    codes, scale = quantize_weight(w)
    reference = quantize(w, 8, axis=-1, symmetric=True)
    np.testing.assert_array_equal(codes, reference.codes)
    np.testing.assert_array_equal(scale, reference.scale.reshape(-1))
    assert codes.dtype == jnp.int8 and scale.dtype == jnp.float32


@pytest.mark.parametrize("spread", [1e-3, 1.0, 1e3])
def test_int8_linear_error_within_documented_bound(spread):
    k = 37
    keys = jax.random.split(jax.random.key(int(spread * 1000)), 4)
    layer = nnx.Linear(k, 5, rngs=nnx.Rngs(0))
    layer.kernel[...] = jax.random.normal(keys[0], (k, 5)) * jnp.array(
        [[1e-3, 0.1, 1.0, 10.0, 0.0]]
    )
    layer.bias[...] = jax.random.normal(keys[1], (5,))
    outliers = jnp.where(jax.random.uniform(keys[2], (6, k)) < 0.05, 50.0, 1.0)
    x = jax.random.normal(keys[3], (6, k)) * spread * outliers
    q = Int8Linear.from_linear(layer)
    error = np.abs(np.asarray(_apply(q, x)) - np.asarray(_apply(layer, x)))
    x, w = np.asarray(x, np.float64), np.asarray(layer.kernel[...], np.float64)
    r_x = np.abs(x).max(axis=1, keepdims=True)
    bound = k / 127 * r_x * np.abs(w).max(axis=0, keepdims=True) * (1 + 1 / 254)
    rounding = 1e-5 * (np.abs(x) @ np.abs(w) + np.abs(np.asarray(layer.bias[...])))
    assert np.all(error <= bound + rounding)
    assert np.all(error[:, 4] <= rounding[:, 4])  # an all-zero output channel stays exact


def test_int8_linear_rows_have_their_own_scale_and_vmap_agrees():
    layer = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
    q = Int8Linear.from_linear(layer)
    x = jnp.stack([jnp.linspace(-1.0, 1.0, 16), 1000.0 * jnp.linspace(-1.0, 1.0, 16)])
    batched = _apply(q, x)
    np.testing.assert_allclose(batched[0], q(x[:1])[0], rtol=1e-6)  # no cross-row influence
    np.testing.assert_allclose(jax.vmap(q)(x), batched, rtol=1e-6)
    np.testing.assert_allclose(batched[0], layer(x[:1])[0], atol=0.02)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"strides": 2, "kernel_dilation": 2},
        {"padding": ((1, 2), (0, 1)), "strides": (2, 1)},
    ],
)
def test_patch_convolution_equals_integer_convolution_exactly(kwargs):
    conv = nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    q = Int8Conv.from_conv(conv)
    codes = _to_int8(jax.random.normal(jax.random.key(2), (2, 7, 6, 3)), jnp.float32(0.02))
    exact = jax.jit(lambda c: _conv(c, q.kernel[...], q, jnp.int32))(codes)
    patches = jax.jit(lambda c: _patch_conv(c, q.kernel[...], q))(codes)
    assert patches.dtype == jnp.int32
    np.testing.assert_array_equal(patches, exact)
    x = jax.random.normal(jax.random.key(3), (2, 7, 6, 3))
    kernel = conv.kernel[...]
    as_float = jax.jit(lambda x: _patch_conv(x, kernel, q, jnp.float32))(x)
    reference = jax.jit(lambda x: _conv(x, kernel, q, None))(x)
    np.testing.assert_allclose(as_float, reference, rtol=1e-5, atol=1e-5)


def test_int8_conv_close_to_float_with_groups_and_unbatched_input():
    conv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    q = Int8Conv.from_conv(conv)
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 4))
    np.testing.assert_allclose(_apply(q, x), conv(x), atol=0.05)
    np.testing.assert_allclose(q(x[0]), q(x[:1])[0], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"padding": "SAME"},
        {"padding": "VALID", "strides": 2, "kernel_dilation": 2},
        {"padding": ((1, 2), (0, 1)), "strides": (2, 1), "use_bias": False},
    ],
)
def test_im2col_conv_equals_the_float_convolution(kwargs):
    mask = jax.random.bernoulli(jax.random.key(4), 0.5, (3, 3, 3, 5))
    conv = nnx.Conv(3, 5, (3, 3), mask=mask, rngs=nnx.Rngs(0), **kwargs)
    fast = Im2colConv.from_conv(conv)
    x = jax.random.normal(jax.random.key(3), (2, 7, 6, 3))
    masked = nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    masked.kernel[...] = conv.kernel[...] * mask
    np.testing.assert_allclose(_apply(fast, x), _apply(masked, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast(x[0]), _apply(fast, x[:1])[0], rtol=1e-5, atol=1e-6)
    assert fast(jnp.stack([x, x])).shape == (2, *_apply(fast, x).shape)
    grouped = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'g'.*feature_group_count=2"):
        Im2colConv.from_conv(grouped, name="g")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("strides", {"strides": (1,), "padding": "SAME", "kernel_dilation": (1, 1)}),
        ("kernel_dilation", {"strides": (1, 1), "padding": "SAME", "kernel_dilation": (1, 1, 1)}),
        ("padding", {"strides": (1, 1), "padding": ((1, 1),), "kernel_dilation": (1, 1)}),
    ],
)
def test_im2col_conv_names_a_setting_without_one_entry_per_spatial_axis(name, kwargs):
    with pytest.raises(ValueError, match=rf"{name} must have one entry per spatial axis \(2 "):
        Im2colConv(jnp.ones((3, 3, 2, 4)), **kwargs)
    with pytest.raises(ValueError, match=r"kernel must be a floating-point array"):
        Im2colConv(jnp.ones((3, 3, 2, 4), jnp.int8), **kwargs)


def test_unsupported_padding_is_refused_by_name():
    conv = nnx.Conv(2, 2, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0))
    model = nnx.Sequential(conv)
    with pytest.raises(ValueError, match="layers/0.*CIRCULAR"):
        to_int8(model)


def test_to_int8_replaces_chosen_layers_and_shares_nothing(images):
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    before = _apply(model, images)
    q = to_int8(model)
    assert isinstance(q.fc1, Int8Linear) and isinstance(q.fc2, Int8Linear)
    assert isinstance(q.fc3, nnx.Linear) and q.fc3 is not model.fc3  # fallback: float copy
    assert q.fc1.kernel.dtype == jnp.int8 and q.fc1.scale.dtype == jnp.float32
    out = _apply(q, images)
    np.testing.assert_allclose(out, before, atol=0.05 * float(jnp.abs(before).max()))
    model.fc3.kernel[...] = model.fc3.kernel[...] * 0  # the original changes ...
    np.testing.assert_array_equal(_apply(q, images), out)  # ... the copy does not
    assert isinstance(model.fc1, nnx.Linear)  # the original keeps its float layers


def test_where_by_name_callable_and_errors():
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    q = to_int8(model, where=["fc2"], fallback=False)
    assert isinstance(q.fc1, nnx.Linear) and isinstance(q.fc2, Int8Linear)
    q = to_int8(model, where=lambda name, m: name == "fc3", fallback=False)
    assert isinstance(q.fc3, Int8Linear) and isinstance(q.fc2, nnx.Linear)
    with pytest.raises(ValueError, match="fc9"):
        to_int8(model, where=["fc9"])
    norm = nnx.Sequential(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="LayerNorm"):
        to_int8(norm, where=lambda name, m: True)
    with pytest.raises(TypeError, match="where"):
        to_int8(model, where="fc1")
    with pytest.raises(TypeError, match="fallback"):
        to_int8(model, fallback=1)


def test_fallback_rule_by_weight_depth_and_rows(images):
    plan = int8_plan(_small_lenet5())
    assert plan["conv1"].startswith("float32 (window x in = 25")
    assert plan["conv2"] == plan["fc1"] == "int8"
    assert plan["fc2"].startswith("float32 (weight 5,000")
    one = int8_plan(LeNet300100(64, rngs=nnx.Rngs(0)), example=images[:1])
    assert one["fc1"] == "float32 (1 rows per call < 16)"


@pytest.mark.parametrize("speedup", [1.0, 2.0])
def test_measured_fallback_keeps_int8_only_where_it_measures_faster(monkeypatch, images, speedup):
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    ranges = calibrate(model, [images])

    def fake_speedup(baseline, candidate, x):  # each layer is timed on its own input
        np.testing.assert_allclose(_apply(candidate, x), _apply(baseline, x), atol=0.05)
        return speedup

    monkeypatch.setattr(integer, "_measured_speedup", fake_speedup)
    plan = int8_plan(model, example=images, calibration=ranges, measure=True)
    q = to_int8(model, ranges, fallback="measure", example=images)
    for name in ("fc1", "fc2", "fc3"):
        if speedup >= 1.05:
            assert plan[name] == "int8 (int8 measured 2.00x float32)"
            assert isinstance(getattr(q, name), Int8Linear)
        else:
            assert plan[name] == "float32 (int8 measured 1.00x float32; int8 < 1.05x)"
            assert type(getattr(q, name)) is nnx.Linear


@pytest.mark.parametrize(("im2col", "int8"), [(3.0, 0.9), (1.0, 2.0), (3.0, 2.0)])
def test_measured_fallback_picks_float_im2col_or_int8_and_keeps_the_stem_float(
    monkeypatch, images, im2col, int8
):
    model = _small_lenet5()
    timed = []

    def fake_speedup(baseline, candidate, x):
        timed.append((type(baseline).__name__, type(candidate).__name__))
        return im2col if isinstance(candidate, Im2colConv) else int8

    monkeypatch.setattr(integer, "_measured_speedup", fake_speedup)
    plan = int8_plan(model, example=images, measure=True)
    q = to_int8(model, fallback="measure", example=images)
    float_kind = "float32-im2col" if im2col >= 1.05 else "float32"
    float_type = Im2colConv if im2col >= 1.05 else nnx.Conv
    # The 1-channel 5x5 stem is never int8, whatever int8 would measure.
    assert plan["conv1"].startswith(f"{float_kind} (window x in = 25 < 64")
    assert f"float32-im2col measured {im2col:.2f}x float32" in plan["conv1"]
    assert type(q.conv1) is float_type
    conv2 = "int8" if int8 >= 1.05 else float_kind
    assert plan["conv2"].startswith(conv2 + " (")
    assert f"int8 measured {int8:.2f}x {float_kind}" in plan["conv2"]
    assert type(q.conv2) is (Int8Conv if int8 >= 1.05 else float_type)
    # int8 is timed against the faster float layer; stems are not timed as int8.
    assert ("Conv", "Im2colConv") in timed
    assert (float_type.__name__, "Int8Conv") in timed
    assert ("Conv", "Int8Conv") not in timed or float_type is nnx.Conv
    assert sum(candidate == "Int8Conv" for _, candidate in timed) == 2  # conv2, twice
    tolerance = 0.05 if int8 >= 1.05 else 1e-4
    np.testing.assert_allclose(_apply(q, images), _apply(model, images), atol=tolerance)


def test_measured_fallback_times_every_layer_and_needs_an_example(images):
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    plan = int8_plan(model, example=images, measure=True)
    assert set(plan) == {"fc1", "fc2", "fc3"}
    for why in plan.values():
        assert why.startswith(("int8 (int8 measured", "float32 (int8 measured"))
    with pytest.raises(ValueError, match="example"):
        int8_plan(model, measure=True)
    with pytest.raises(ValueError, match="example"):
        to_int8(model, fallback="measure")
    with pytest.raises(TypeError, match="fallback"):
        to_int8(model, fallback="fast")


def test_calibrate_records_absmax_and_percentile_of_layer_inputs(images):
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    batches = [images[:3], images[3:]]
    ranges = calibrate(model, batches)
    hidden = nnx.relu(model.fc1(images.reshape(6, -1)))
    np.testing.assert_allclose(ranges["fc1"], jnp.abs(images).max(), rtol=1e-6)
    np.testing.assert_allclose(ranges["fc2"], hidden.max(), rtol=1e-6)
    low = calibrate(model, batches, method="percentile", percentile=50.0)
    assert all(float(low[name]) < float(ranges[name]) for name in ranges)
    with pytest.raises(ValueError, match="method"):
        calibrate(model, batches, method="minmax")
    with pytest.raises(ValueError, match="percentile"):
        calibrate(model, batches, method="percentile", percentile=0)
    with pytest.raises(ValueError, match="calibration lacks"):
        to_int8(model, {"fc1": 1.0})


def test_static_input_scale_saturates_beyond_the_range():
    layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    q = Int8Linear.from_linear(layer, input_range=1.0)
    x = jnp.array([[0.5, -3.0, 2.0, 0.25]])
    np.testing.assert_allclose(q(x), q(jnp.clip(x, -1.0, 1.0)), rtol=1e-6)


@pytest.mark.parametrize("static", [False, True])
def test_qat_model_and_int8_model_give_the_same_logits(images, static):
    model = _small_lenet5()
    calibration = calibrate(model, [images]) if static else None
    qat = to_qat(model, calibration)
    assert isinstance(qat.conv2, FakeQuant)
    q = to_int8(qat, fallback=False)
    assert isinstance(q.conv2, Int8Conv) and (q.conv2.input_scale is not None) == static
    expected = _apply(qat, images)
    np.testing.assert_allclose(_apply(q, images), expected, rtol=1e-5, atol=1e-5)


def test_qat_gradient_reaches_the_float_weights(images):
    qat = to_qat(LeNet300100(64, rngs=nnx.Rngs(0)))
    grads = nnx.grad(lambda m: jnp.sum(m(images) ** 2))(qat)
    assert float(jnp.abs(grads["fc1"]["layer"]["kernel"][...]).sum()) > 0


def _block_with_statistics():
    model = ResidualBlock(1, 4, stride=2, rngs=nnx.Rngs(0))
    for i, (_, bn) in enumerate(
        (p, n) for p, n in nnx.iter_graph(model) if isinstance(n, nnx.BatchNorm)
    ):
        keys = jax.random.split(jax.random.key(i), 4)
        bn.mean[...] = 0.1 * jax.random.normal(keys[0], bn.mean.shape)
        bn.var[...] = jax.random.uniform(keys[1], bn.var.shape) + 0.5
        bn.scale[...] = jax.random.uniform(keys[2], bn.scale.shape) + 0.5
        bn.bias[...] = 0.1 * jax.random.normal(keys[3], bn.bias.shape)
    model.eval()
    return model


def test_fold_batchnorm_keeps_residual_outputs_and_converts(images):
    model = _block_with_statistics()
    folded = fold_batchnorm(model)
    assert isinstance(folded.shortcut_bn, Identity) and isinstance(folded.bn2, Identity)
    assert isinstance(model.shortcut_bn, nnx.BatchNorm)
    expected = _apply(model, images)
    np.testing.assert_allclose(_apply(folded, images), expected, atol=2e-5, rtol=1e-5)
    q = to_int8(folded, fallback=False)
    assert isinstance(q.conv2, Int8Conv) and isinstance(q.shortcut_conv, Int8Conv)
    np.testing.assert_allclose(
        _apply(q, images), expected, atol=0.1 * float(jnp.abs(expected).max())
    )


def test_fold_batchnorm_refuses_a_batch_norm_without_its_convolution():
    class Odd(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(1, 2, (3, 3), rngs=nnx.Rngs(0))
            self.norm_bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="norm_bn.*pairs"):
        fold_batchnorm(Odd())
    folded = fold_batchnorm(Odd(), {"norm_bn": "conv"})
    assert isinstance(folded.norm_bn, Identity)


def test_int8_model_under_sharding_matches_single_device(images):
    q = to_int8(_small_lenet5(), fallback=False)
    expected = _apply(q, images)
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_allclose(_apply(q, sharded), expected, rtol=1e-6, atol=1e-6)


def test_int8_model_round_trips_through_the_archive(images):
    model = _small_lenet5()
    q = to_int8(model, calibrate(model, [images]), fallback=False)
    data = archive.dumps(nnx.state(q))
    kinds = {t.name: t.dtype for t in archive.inspect(data).tensors}
    assert kinds["conv2/kernel"] == "int8" and kinds["conv2/scale"] == "float32"
    assert kinds["conv2/input_scale"] == "float32"
    other = LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(5))
    fresh = to_int8(other, calibrate(other, [images]), fallback=False)
    nnx.update(fresh, archive.loads(data))
    np.testing.assert_array_equal(fresh.conv2.kernel[...], q.conv2.kernel[...])
    np.testing.assert_array_equal(_apply(fresh, images), _apply(q, images))


def test_cli_evaluate_int8_prints_accuracy_and_latency_beside_float32(tmp_path, capsys):
    import optax

    from jaxopt_nn import cli
    from jaxopt_nn import train as train_lib

    model = LeNet300100(64, rngs=nnx.Rngs(0))
    _, state = train_lib.init_train_state(model, optax.identity())
    path = tmp_path / "model.jnz"
    metadata = {"model": "lenet300", "in_shape": [8, 8, 1], "num_classes": 10}
    archive.save(path, {"params": state.params}, metadata=metadata)
    assert cli.main(["evaluate", str(path), "--int8"]) == 0
    out = capsys.readouterr().out
    float_line = next(line for line in out.splitlines() if line.startswith("float32 "))
    int8_line = next(line for line in out.splitlines() if line.startswith("int8-dynamic "))
    assert " ms " in float_line and int8_line.endswith("x")
    assert "int8 layers: fc1, fc2" in out and "kept in float32" in out and "fc3" in out
