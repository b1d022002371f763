"""Tests for jaxopt_nn.models: shapes, shortcuts, auxiliary heads and loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_nn import tree
from jaxopt_nn.models import (
    BottleneckBlock,
    LeNet5,
    LeNet300100,
    ResidualBlock,
    ResNet,
    SmallCNN,
    auxiliary_loss,
)


def _out_shape(make, x_shape, **call_kwargs):
    """Output shapes of ``make()(x)`` without allocating or compiling anything."""
    return nnx.eval_shape(lambda: make()(jnp.zeros(x_shape), **call_kwargs))


def _materialize(make, seed=0):
    """Build ``make()`` abstractly and fill it with random NumPy values.

    Eager initialisation compiles one random kernel per parameter shape;
    this gives a real model without compiling anything. Batch-norm running
    means are 0 and variances 1.
    """
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = tree.path_name(path)
        if name.endswith("/var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name.endswith("/mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.5 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _param_names(make):
    return [name for name, _ in tree.leaves_with_names(nnx.state(nnx.eval_shape(make), nnx.Param))]


@pytest.mark.parametrize(
    "make, x_shape, num_classes",
    [
        (lambda: LeNet300100(rngs=nnx.Rngs(0)), (3, 28, 28, 1), 10),
        (lambda: LeNet300100(64, 7, rngs=nnx.Rngs(0)), (3, 8, 8, 1), 7),
        (lambda: LeNet300100(12, hidden=(5, 4), rngs=nnx.Rngs(0)), (3, 12), 10),
        (lambda: LeNet5(rngs=nnx.Rngs(0)), (3, 28, 28, 1), 10),
        (lambda: LeNet5((16, 20, 2), 4, rngs=nnx.Rngs(0)), (3, 16, 20, 2), 4),
        (lambda: LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0)), (3, 8, 8, 1), 10),
        (lambda: LeNet5((3, 5, 1), padding="SAME", rngs=nnx.Rngs(0)), (3, 3, 5, 1), 10),
        (lambda: SmallCNN(rngs=nnx.Rngs(0)), (3, 32, 32, 3), 10),
        (lambda: SmallCNN((8, 8, 1), rngs=nnx.Rngs(0)), (3, 8, 8, 1), 10),
        (lambda: SmallCNN((7, 5, 2), 3, rngs=nnx.Rngs(0)), (3, 7, 5, 2), 3),
        (lambda: ResNet(20, rngs=nnx.Rngs(0)), (3, 32, 32, 3), 10),
        (lambda: ResNet(8, 100, width=4, in_channels=1, rngs=nnx.Rngs(0)), (3, 8, 8, 1), 100),
        (lambda: ResNet(11, bottleneck=True, width=4, rngs=nnx.Rngs(0)), (3, 9, 9, 3), 10),
    ],
)
def test_every_model_maps_a_batch_to_logits(make, x_shape, num_classes):
    out = _out_shape(make, x_shape)
    assert out.shape == (x_shape[0], num_classes)
    assert out.dtype == jnp.float32


@settings(max_examples=25, deadline=None)
@given(height=st.integers(1, 40), width=st.integers(1, 40), channels=st.integers(1, 3))
def test_conv_models_derive_the_flatten_size_from_any_input_shape(height, width, channels):
    in_shape = (height, width, channels)
    out = _out_shape(lambda: SmallCNN(in_shape, rngs=nnx.Rngs(0)), (2, *in_shape))
    assert out.shape == (2, 10)
    out = _out_shape(lambda: LeNet5(in_shape, padding="SAME", rngs=nnx.Rngs(0)), (2, *in_shape))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("size, fc1_in", [(28, 4 * 4 * 50), (32, 5 * 5 * 50), (16, 1 * 1 * 50)])
def test_lenet5_valid_is_the_classic_network(size, fc1_in):
    # conv5 VALID -> pool2 -> conv5 VALID -> pool2: ((size - 4) // 2 - 4) // 2.
    model = nnx.eval_shape(lambda: LeNet5((size, size, 1), rngs=nnx.Rngs(0)))
    assert (
        model.fc1.in_features
        == fc1_in
        == ((size - 4) // 2 - 4) // 2 * ((size - 4) // 2 - 4) // 2 * 50
    )


def test_lenet300100_param_names_follow_the_contract():
    names = _param_names(lambda: LeNet300100(64, rngs=nnx.Rngs(0)))
    assert sorted(names) == sorted(
        f"fc{i}/{leaf}" for i in (1, 2, 3) for leaf in ("kernel", "bias")
    )
    model = nnx.eval_shape(lambda: LeNet300100(64, rngs=nnx.Rngs(0)))
    assert (
        tree.count_params(nnx.state(model, nnx.Param))
        == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    )


@pytest.mark.parametrize("block_cls", [ResidualBlock, BottleneckBlock])
@pytest.mark.parametrize(
    "in_channels, out_channels, stride",
    [(8, 8, 1), (8, 8, 2), (4, 8, 1), (4, 8, 2), (8, 4, 1)],
)
def test_projection_shortcut_appears_exactly_when_the_shape_changes(
    block_cls, in_channels, out_channels, stride
):
    make = lambda: block_cls(in_channels, out_channels, stride=stride, rngs=nnx.Rngs(0))  # noqa: E731
    shape_changes = stride != 1 or in_channels != out_channels
    block = nnx.eval_shape(make)
    assert block.has_projection == shape_changes
    names = _param_names(make)
    assert ("shortcut_conv/kernel" in names) == shape_changes
    out = _out_shape(make, (2, 7, 7, in_channels))
    assert out.shape == (2, -(-7 // stride), -(-7 // stride), out_channels)


def _zero_residual_branch(block):
    """Zero the last convolution: the branch then outputs its batch norm's bias."""
    last_conv, last_bn = (
        (block.conv3, block.bn3) if isinstance(block, BottleneckBlock) else (block.conv2, block.bn2)
    )
    last_conv.kernel[...] = jnp.zeros_like(last_conv.kernel[...])
    return np.asarray(last_bn.bias[...])


@pytest.mark.parametrize("block_cls", [ResidualBlock, BottleneckBlock])
@pytest.mark.parametrize("in_channels, stride", [(8, 1), (4, 1), (8, 2)])
def test_shortcut_computes_identity_or_projection(block_cls, in_channels, stride):
    block = _materialize(lambda: block_cls(in_channels, 8, stride=stride, rngs=nnx.Rngs(1)))
    block.eval()  # running averages: mean 0, var 1
    branch = _zero_residual_branch(block)[None, None, None, :]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, in_channels)), jnp.float32)
    if block.has_projection:
        kernel = np.asarray(block.shortcut_conv.kernel[...])[0, 0]  # (in, out)
        bn = block.shortcut_bn
        xs = np.asarray(x)[:, ::stride, ::stride, :]
        shortcut = xs @ kernel / np.sqrt(1.0 + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(
            bn.bias[...]
        )
    else:
        shortcut = np.asarray(x)
    expected = np.maximum(shortcut + branch, 0.0)
    out = nnx.jit(lambda block, x: block(x))(block, x)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth, bottleneck", [(20, False), (32, False), (11, True), (20, True)])
def test_resnet_depth_and_projection_count(depth, bottleneck):
    model = nnx.eval_shape(lambda: ResNet(depth, bottleneck=bottleneck, rngs=nnx.Rngs(0)))
    n = (depth - 2) // (9 if bottleneck else 6)
    assert [len(stage) for stage in model.stages] == [n, n, n]
    projections = [[block.has_projection for block in stage] for stage in model.stages]
    # First block of stages 2 and 3 (stride 2, wider); with bottlenecks also the
    # first block of stage 1, whose output is 4x wider than the stem.
    expected_first = [bottleneck, True, True]
    assert [p[0] for p in projections] == expected_first
    assert not any(p for stage in projections for p in stage[1:])
    convs_per_block = 3 if bottleneck else 2
    kernels = [
        name
        for name in _param_names(lambda: ResNet(depth, bottleneck=bottleneck, rngs=nnx.Rngs(0)))
        if name.endswith("kernel") and "shortcut" not in name
    ]
    # The depth counts weight layers: stem + the blocks' convolutions + fc.
    assert len(kernels) == 1 + 3 * n * convs_per_block + 1 == depth


def test_resnet20_has_the_published_parameter_count():
    model = nnx.eval_shape(lambda: ResNet(20, rngs=nnx.Rngs(0)))
    # He et al. report 0.27M parameters (option A shortcuts); the two 1x1
    # projections add 16*32 + 32*64 weights and 2 * 2 * (32 + 64) BN terms.
    count = tree.count_params(nnx.state(model, nnx.Param))
    assert 0.27e6 <= count <= 0.275e6


def test_resnet_aux_heads_return_one_logit_set_per_intermediate_stage():
    out, aux = _out_shape(
        lambda: ResNet(8, 5, width=4, aux_heads=True, rngs=nnx.Rngs(0)),
        (3, 8, 8, 3),
        return_aux=True,
    )
    assert out.shape == (3, 5)
    assert [a.shape for a in aux] == [(3, 5), (3, 5)]
    names = _param_names(lambda: ResNet(8, 5, width=4, aux_heads=True, rngs=nnx.Rngs(0)))
    assert {"aux_fcs/0/kernel", "aux_fcs/1/kernel"} <= set(names)
    out, aux = _out_shape(
        lambda: ResNet(8, width=4, rngs=nnx.Rngs(0)), (3, 8, 8, 3), return_aux=True
    )
    assert aux == []


def test_resnet_aux_logits_are_linear_heads_on_stage_features():
    model = _materialize(
        lambda: ResNet(8, 3, width=2, in_channels=1, aux_heads=True, rngs=nnx.Rngs(0))
    )
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).random((2, 4, 4, 1)), jnp.float32)

    @nnx.jit
    def forward(model, x):
        logits, aux = model(x, return_aux=True)
        features = model.stages[0][0](nnx.relu(model.stem_bn(model.stem_conv(x))))
        return logits, aux, features, model(x)

    logits, aux, h, plain = forward(model, x)
    head = model.aux_fcs[0]
    expected = (
        np.asarray(h).mean(axis=(1, 2)) @ np.asarray(head.kernel[...])
        + np.asarray(head.bias[...])[None, :]
    )
    np.testing.assert_allclose(np.asarray(aux[0]), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain))


@settings(max_examples=25, deadline=None)
@given(
    main=st.floats(0, 10),
    aux=st.lists(st.floats(0, 10), max_size=4),
    lam=st.floats(0, 2),
)
def test_auxiliary_loss_equals_the_formula(main, aux, lam):
    total = auxiliary_loss(jnp.float32(main), [jnp.float32(a) for a in aux], lam)
    np.testing.assert_allclose(float(total), main + lam * sum(aux), rtol=1e-5, atol=1e-5)


def test_auxiliary_loss_is_differentiable_in_each_term():
    grads = jax.grad(lambda m, a: auxiliary_loss(m, a, 0.3), argnums=(0, 1))(
        jnp.float32(1.0), [jnp.float32(2.0), jnp.float32(3.0)]
    )
    np.testing.assert_allclose(np.asarray(grads[0]), 1.0)
    np.testing.assert_allclose(np.asarray(grads[1]), [0.3, 0.3], rtol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: auxiliary_loss(jnp.float32(1.0), [], -0.1), "lam must be >= 0; got lam=-0.1"),
        (
            lambda: LeNet300100(0, rngs=nnx.Rngs(0)),
            "in_features must be a positive int; got in_features=0",
        ),
        (lambda: LeNet300100(hidden=(300,), rngs=nnx.Rngs(0)), r"hidden must hold two widths"),
        (
            lambda: LeNet300100(num_classes=0, rngs=nnx.Rngs(0)),
            "num_classes must be a positive int",
        ),
        (lambda: LeNet5((28, 28), rngs=nnx.Rngs(0)), r"in_shape must be three positive ints"),
        (
            lambda: LeNet5((8, 8, 1), rngs=nnx.Rngs(0)),
            r"too small for padding='VALID'.*use padding='SAME'",
        ),
        (
            lambda: LeNet5(padding="same", rngs=nnx.Rngs(0)),
            r"padding must be 'SAME' or 'VALID'; got padding='same'",
        ),
        (lambda: SmallCNN((0, 8, 1), rngs=nnx.Rngs(0)), r"in_shape must be three positive ints"),
        (lambda: ResNet(21, rngs=nnx.Rngs(0)), r"depth must be 6n \+ 2 with n >= 1.*got depth=21"),
        (lambda: ResNet(2, rngs=nnx.Rngs(0)), r"depth must be 6n \+ 2"),
        (
            lambda: ResNet(21, bottleneck=True, rngs=nnx.Rngs(0)),
            r"depth must be 9n \+ 2.*got depth=21",
        ),
        (
            lambda: ResNet(20, width=0, rngs=nnx.Rngs(0)),
            "width must be a positive int; got width=0",
        ),
        (
            lambda: ResidualBlock(4, 4, stride=0, rngs=nnx.Rngs(0)),
            "stride must be a positive int; got stride=0",
        ),
        (
            lambda: BottleneckBlock(4, 6, rngs=nnx.Rngs(0)),
            "out_channels must be a multiple of expansion=4; got out_channels=6",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        nnx.eval_shape(make)
