"""Tests for jaxopt_nn.structured: channel groups from the jaxpr, importance, shrink."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_nn import structured, tree
from jaxopt_nn.models import LeNet5, LeNet300100, ResNet, SmallCNN
from jaxopt_nn.speed import count_flops


def _materialize(make, seed=0):
    """``make()`` built abstractly and filled from NumPy (no per-shape compilation)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = tree.path_name(path)
        if name.endswith("/var"):
            return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        return (0.5 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    filled = jax.tree_util.tree_map_with_path(lambda p, v: jnp.asarray(fill(p, v)), state)
    return nnx.merge(graphdef, filled)


def _spec(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _summary(groups):
    return [(g.size, {(m.path, m.axis, m.index.shape[1]) for m in g.members}) for g in groups]


class Concat(nnx.Module):
    """Two branches concatenated on the feature axis, then a dense layer."""

    def __init__(self, rngs):
        self.a = nnx.Linear(4, 6, rngs=rngs)
        self.b = nnx.Linear(4, 5, rngs=rngs)
        self.out = nnx.Linear(11, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.concatenate([nnx.relu(self.a(x)), jnp.tanh(self.b(x))], axis=-1))


class Depthwise(nnx.Module):
    """conv -> depthwise (channel multiplier) -> pointwise -> global pool -> dense."""

    def __init__(self, multiplier, rngs):
        self.c1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
        self.dw = nnx.Conv(6, 6 * multiplier, (3, 3), feature_group_count=6, rngs=rngs)
        self.pw = nnx.Conv(6 * multiplier, 4, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.pw(nnx.relu(self.dw(nnx.relu(self.c1(x)))))
        return self.fc(x.mean(axis=(1, 2)))


class Gather(nnx.Module):
    """Indexes channels with an array: a gather, which the analysis does not know."""

    def __init__(self, rngs):
        self.a = nnx.Linear(4, 6, rngs=rngs)
        self.b = nnx.Linear(2, 2, rngs=rngs)
        self.c = nnx.Linear(4, 5, rngs=rngs)
        self.d = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        picked = jnp.take(self.a(x), jnp.array([0, 2]), axis=1)
        return self.b(picked) + self.d(nnx.relu(self.c(x)))


class LayerNormMLP(nnx.Module):
    """A layer norm mixes the features it normalises: its axis cannot be pruned."""

    def __init__(self, rngs):
        self.a = nnx.Linear(4, 6, rngs=rngs)
        self.norm = nnx.LayerNorm(6, rngs=rngs)
        self.b = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.b(self.norm(self.a(x)))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


def test_lenet300_has_two_groups_of_300_and_100():
    model = nnx.eval_shape(lambda: LeNet300100(64, rngs=nnx.Rngs(0)))
    groups = structured.dependency_groups(model, _spec((2, 8, 8, 1)))
    assert _summary(groups) == [
        (300, {("fc1/kernel", 1, 1), ("fc1/bias", 0, 1), ("fc2/kernel", 0, 1)}),
        (100, {("fc2/kernel", 1, 1), ("fc2/bias", 0, 1), ("fc3/kernel", 0, 1)}),
    ]
    for group in groups:
        for member in group.members:
            np.testing.assert_array_equal(member.index[:, 0], np.arange(group.size))


@pytest.mark.parametrize(
    "make, spatial",
    [
        (lambda: LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0)), 4),
        (lambda: LeNet5(rngs=nnx.Rngs(0)), 16),
    ],
)
def test_lenet5_flatten_maps_a_conv_channel_to_strided_dense_rows(make, spatial):
    model = nnx.eval_shape(make)
    shape = (2, 8, 8, 1) if spatial == 4 else (2, 28, 28, 1)
    groups = structured.dependency_groups(model, _spec(shape))
    assert _summary(groups) == [
        (20, {("conv1/kernel", 3, 1), ("conv1/bias", 0, 1), ("conv2/kernel", 2, 1)}),
        (50, {("conv2/kernel", 3, 1), ("conv2/bias", 0, 1), ("fc1/kernel", 0, spatial)}),
        (500, {("fc1/kernel", 1, 1), ("fc1/bias", 0, 1), ("fc2/kernel", 0, 1)}),
    ]
    (rows,) = [m for m in groups[1].members if m.path == "fc1/kernel"]
    np.testing.assert_array_equal(rows.index, np.arange(50)[:, None] + 50 * np.arange(spatial))


def test_small_cnn_groups():
    model = nnx.eval_shape(lambda: SmallCNN((8, 8, 1), rngs=nnx.Rngs(0)))
    groups = structured.dependency_groups(model, _spec((2, 8, 8, 1)))
    assert [g.size for g in groups] == [32, 64, 128]
    assert ("fc1/kernel", 0, 4) in _summary(groups)[1][1]


def test_resnet20_residual_stream_of_a_stage_is_one_group():
    model = nnx.eval_shape(lambda: ResNet(20, in_channels=1, rngs=nnx.Rngs(0)))
    groups = structured.dependency_groups(model, _spec((2, 8, 8, 1)))
    # Three residual streams plus the inner channels of each of the nine blocks.
    assert sorted(g.size for g in groups) == [16] * 4 + [32] * 4 + [64] * 4
    paths = [{m.path for m in g.members} for g in groups]
    (stream0,) = [p for p in paths if "stem_conv/kernel" in p]
    assert {f"stages/0/{j}/bn2/scale" for j in range(3)} <= stream0
    assert {"stages/1/0/conv1/kernel", "stages/1/0/shortcut_conv/kernel"} <= stream0
    (stream2,) = [p for p in paths if "fc/kernel" in p]
    assert {"stages/2/0/shortcut_bn/mean", "stages/2/0/shortcut_bn/var"} <= stream2
    assert {"stages/2/2/conv2/kernel", "stages/2/1/conv1/kernel"} <= stream2
    inner = [p for p in paths if "stages/1/1/conv1/kernel" in p and "stages/1/1/bn1/scale" in p]
    assert inner == [
        {f"stages/1/1/bn1/{n}" for n in ("scale", "bias", "mean", "var")}
        | {"stages/1/1/conv1/kernel", "stages/1/1/conv2/kernel"}
    ]
    # Input channels of the stem and the logits are never members.
    members = {(m.path, m.axis) for g in groups for m in g.members}
    assert ("stem_conv/kernel", 2) not in members
    assert ("fc/kernel", 1) not in members and ("fc/bias", 0) not in members


def test_training_mode_finds_the_running_statistics_too():
    model = nnx.eval_shape(lambda: ResNet(8, width=4, in_channels=1, rngs=nnx.Rngs(0)))
    train_groups = structured.dependency_groups(model, _spec((2, 6, 6, 1)))
    model.eval()
    eval_groups = structured.dependency_groups(model, _spec((2, 6, 6, 1)))
    assert _summary(train_groups) == _summary(eval_groups)


def test_concatenation_offsets_the_consumer_rows():
    groups = structured.dependency_groups(
        nnx.eval_shape(lambda: Concat(nnx.Rngs(0))), _spec((2, 4))
    )
    assert [g.size for g in groups] == [6, 5]
    rows = [next(m for m in g.members if m.path == "out/kernel") for g in groups]
    np.testing.assert_array_equal(rows[0].index[:, 0], np.arange(6))
    np.testing.assert_array_equal(rows[1].index[:, 0], 6 + np.arange(5))


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_couples_its_input_and_output_channels(multiplier):
    groups = structured.dependency_groups(
        nnx.eval_shape(lambda: Depthwise(multiplier, nnx.Rngs(0))), _spec((2, 6, 6, 1))
    )
    assert _summary(groups)[0] == (
        6,
        {
            ("c1/kernel", 3, 1),
            ("c1/bias", 0, 1),
            ("dw/kernel", 3, multiplier),
            ("dw/bias", 0, multiplier),
            ("pw/kernel", 2, multiplier),
        },
    )
    dw = next(m for m in groups[0].members if m.path == "dw/kernel")
    np.testing.assert_array_equal(dw.index, np.arange(6 * multiplier).reshape(6, multiplier))


def test_unsupported_primitive_is_an_error_naming_it():
    with pytest.raises(NotImplementedError, match="'gather'"):
        structured.dependency_groups(nnx.eval_shape(lambda: Gather(nnx.Rngs(0))), _spec((2, 4)))


def test_unsupported_primitive_excluded_with_a_warning():
    with pytest.warns(UserWarning, match="'gather'"):
        groups = structured.dependency_groups(
            nnx.eval_shape(lambda: Gather(nnx.Rngs(0))), _spec((2, 4)), unsupported="exclude"
        )
    # The gathered branch is out; the independent branch still forms its group.
    assert _summary(groups) == [(5, {("c/kernel", 1, 1), ("c/bias", 0, 1), ("d/kernel", 0, 1)})]


def test_a_layer_norm_axis_is_left_out():
    assert (
        structured.dependency_groups(
            nnx.eval_shape(lambda: LayerNormMLP(nnx.Rngs(0))), _spec((2, 4))
        )
        == []
    )


def test_linen_model_through_the_bridge():
    model = nnx.bridge.ToNNX(LinenMLP(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(model, jnp.zeros((1, 5)))
    groups = structured.dependency_groups(model, jnp.zeros((2, 5)))
    assert _summary(groups) == [
        (16, {("Dense_0/kernel", 1, 1), ("Dense_0/bias", 0, 1), ("Dense_1/kernel", 0, 1)})
    ]
    keep = [np.arange(8)]
    masks = structured.channel_masks(model, groups, keep)
    assert float(np.asarray(masks["Dense_0"]["kernel"]).sum()) == 5 * 8
    with pytest.raises(TypeError, match="Linen module.*write it in NNX"):
        structured.shrink(model, groups, keep)


def _masked(model, groups, keep):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    masks = structured.channel_masks(model, groups, keep)
    masked = jax.tree.map(lambda p, m: jnp.asarray(np.asarray(p) * np.asarray(m)), params, masks)
    return nnx.merge(graphdef, masked, rest, copy=True)


_EQUIVALENCE_MODELS = {
    "lenet5": (lambda: LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0)), (3, 8, 8, 1)),
    "resnet8": (lambda: ResNet(8, width=4, in_channels=1, rngs=nnx.Rngs(0)), (3, 6, 6, 1)),
    "concat": (lambda: Concat(nnx.Rngs(0)), (3, 4)),
    "depthwise": (lambda: Depthwise(2, nnx.Rngs(0)), (3, 5, 5, 1)),
}


@pytest.fixture(scope="module")
def traced():
    out = {}
    for name, (make, shape) in _EQUIVALENCE_MODELS.items():
        model = _materialize(make)
        model.eval()
        x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
        groups = structured.dependency_groups(model, x)
        out[name] = (model, x, groups, jax.jit(lambda m, x: m(x)))
    return out


@settings(max_examples=5, deadline=None)
@given(name=st.sampled_from(sorted(_EQUIVALENCE_MODELS)), seed=st.integers(0, 2**16))
def test_removing_channels_with_zero_weights_keeps_the_outputs(traced, name, seed):
    model, x, groups, forward = traced[name]
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.choice(g.size, rng.integers(1, g.size + 1), replace=False)) for g in groups]
    small = structured.shrink(model, groups, keep)
    expected = forward(_masked(model, groups, keep), x)
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(forward(small, x), expected, rtol=1e-5, atol=1e-5 * scale)
    removed = sum(g.size - len(k) for g, k in zip(groups, keep, strict=True))
    assert (
        tree.count_params(nnx.state(small, nnx.Param))
        <= tree.count_params(nnx.state(model, nnx.Param)) - removed
    )


def test_zero_consumers_alone_leave_the_outputs_unchanged():
    """Only the consumers' rows are zero; the producers still compute the removed channels."""
    model = _materialize(lambda: LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 8, 1)), jnp.float32)
    groups = structured.dependency_groups(model, x)
    keep = [np.arange(0, 20, 2), np.arange(1, 50, 3), np.arange(400)]
    consumers = {"conv2/kernel": 2, "fc1/kernel": 0, "fc2/kernel": 0}
    for group, kept in zip(groups, keep, strict=True):
        drop = np.setdiff1d(np.arange(group.size), kept)
        for m in group.members:
            if consumers.get(m.path) == m.axis:
                variable = getattr(model, m.path.split("/")[0]).kernel
                index = [slice(None)] * variable.ndim
                index[m.axis] = m.index[drop].ravel()
                value = np.array(variable[...])
                value[tuple(index)] = 0.0
                variable[...] = jnp.asarray(value)
    small = structured.shrink(model, groups, keep)
    expected = model(x)
    np.testing.assert_allclose(
        small(x), expected, rtol=1e-5, atol=1e-5 * float(abs(expected).max())
    )


def test_shrink_leaves_the_original_and_sets_the_size_attributes():
    model = _materialize(lambda: SmallCNN((8, 8, 1), rngs=nnx.Rngs(0)))
    x = jnp.zeros((2, 8, 8, 1))
    groups = structured.dependency_groups(model, x)
    small = structured.shrink(model, groups, [np.arange(8), np.arange(16), np.arange(32)])
    assert model.conv2.kernel.shape == (3, 3, 32, 64) and model.fc1.in_features == 256
    assert (small.conv1.out_features, small.conv2.in_features, small.conv2.out_features) == (
        8,
        8,
        16,
    )
    assert small.conv2.kernel_shape == small.conv2.kernel.shape == (3, 3, 8, 16)
    assert (small.fc1.in_features, small.fc1.out_features, small.fc2.in_features) == (64, 32, 32)
    assert small(x).shape == (2, 10)
    assert count_flops(small, x) < count_flops(model, x) / 4


def test_shrunk_model_is_rebuilt_from_its_stored_arrays():
    """As an archive is read: the abstract dense model plus the stored, smaller arrays."""
    make = lambda: ResNet(8, width=4, in_channels=1, rngs=nnx.Rngs(0))  # noqa: E731
    model = _materialize(make)
    model.eval()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 6, 1)), jnp.float32)
    groups = structured.dependency_groups(model, x)
    small = structured.shrink(model, groups, [np.arange(2)] * len(groups))
    stored = {n: np.asarray(v) for n, v in tree.leaves_with_names(nnx.state(small))}
    rebuilt = structured.resized(nnx.eval_shape(make), stored)
    rebuilt.eval()
    np.testing.assert_array_equal(rebuilt(x), small(x))
    assert rebuilt.stages[1][0].shortcut_conv.in_features == 2
    assert rebuilt.stages[1][0].shortcut_bn.num_features == 2


def test_importance_criteria_against_hand_computed_values():
    model = _materialize(lambda: LeNet300100(12, hidden=(5, 4), rngs=nnx.Rngs(0)))
    groups = structured.dependency_groups(model, jnp.zeros((1, 12)))
    w1, b1, w2 = (np.array(a) for a in (model.fc1.kernel, model.fc1.bias, model.fc2.kernel))
    l1, l2 = (structured.group_importance(model, groups, c)[0] for c in ("l1", "l2"))
    np.testing.assert_allclose(l1, abs(w1).sum(0) + abs(b1) + abs(w2).sum(1), rtol=1e-6)
    np.testing.assert_allclose(l2, np.sqrt((w1**2).sum(0) + b1**2 + (w2**2).sum(1)), rtol=1e-6)
    # A dead unit (zero weights in, zero bias) has zero gradient out: Taylor score 0.
    w1[:, 2], b1[2] = 0.0, 0.0
    model.fc1.kernel[...], model.fc1.bias[...] = jnp.asarray(w1), jnp.asarray(b1)
    batch = (jnp.ones((3, 12)), jnp.array([0, 1, 2]))
    taylor = structured.group_importance(model, groups, "taylor", batch=batch)[0]
    assert taylor[2] == 0.0 and taylor.sum() > 0
    with pytest.raises(ValueError, match="normalisation scale"):
        structured.group_importance(model, groups, "bn")
    with pytest.raises(ValueError, match="batch"):
        structured.group_importance(model, groups, "taylor")
    with pytest.raises(ValueError, match="criterion"):
        structured.group_importance(model, groups, "l3")


def test_bn_importance_is_the_sum_of_the_groups_gammas():
    model = _materialize(lambda: ResNet(8, width=4, in_channels=1, rngs=nnx.Rngs(0)))
    groups = structured.dependency_groups(model, _spec((2, 6, 6, 1)))
    scores = structured.group_importance(model, groups, "bn")
    for group, score in zip(groups, scores, strict=True):
        gammas = [m for m in group.members if m.path.endswith("bn1/scale")]
        if len(gammas) == 1 and len([m for m in group.members if "scale" in m.path]) == 1:
            path = gammas[0].path.split("/")
            bn = model.stages[int(path[1])][int(path[2])].bn1
            np.testing.assert_allclose(score, abs(np.asarray(bn.scale)), rtol=1e-6)


@settings(deadline=None)  # wall-clock deadlines flake on a loaded machine
@given(
    scores=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=40),
    fraction=st.floats(0, 0.99),
    round_to=st.integers(1, 8),
)
def test_keep_top_counts_order_and_rounding(scores, fraction, round_to):
    scores = np.array(scores, np.float32)
    (kept,) = structured.keep_top([scores], fraction, round_to=round_to)
    n = len(scores)
    target = max(1, n - round(fraction * n))
    assert len(kept) == min(n, -(-target // round_to) * round_to)
    assert np.all(np.diff(kept) > 0)
    dropped = np.setdiff1d(np.arange(n), kept)
    if len(dropped):
        assert scores[kept].min() >= scores[dropped].max()


def test_prune_channels_by_name_and_round_to():
    model = _materialize(lambda: LeNet300100(12, hidden=(40, 30), rngs=nnx.Rngs(0)))
    small = structured.prune_channels(model, jnp.zeros((1, 12)), {"fc1/kernel": 0.5}, round_to=8)
    assert (small.fc1.out_features, small.fc2.out_features) == (24, 30)
    small = structured.prune_channels(model, jnp.zeros((1, 12)), 0.75)
    assert (small.fc1.out_features, small.fc2.out_features) == (10, 8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, g: structured.dependency_groups(3, jnp.zeros((1, 12))), TypeError, "model"),
        (
            lambda m, g: structured.dependency_groups(m, jnp.zeros((1, 12)), unsupported="x"),
            ValueError,
            "unsupported",
        ),
        (lambda m, g: structured.shrink(m, g, [np.arange(3)]), ValueError, "one index array"),
        (lambda m, g: structured.shrink(m, g, [[], [0]]), ValueError, r"keep\[0\]"),
        (lambda m, g: structured.shrink(m, g, [[0, 0], [0]]), ValueError, r"keep\[0\]"),
        (lambda m, g: structured.shrink(m, g, [[0], [4]]), ValueError, r"keep\[1\]"),
        (lambda m, g: structured.shrink(m, [1], [[0]]), TypeError, "ChannelGroup"),
        (
            lambda m, g: structured.prune_channels(m, jnp.zeros((1, 12)), 1.0),
            ValueError,
            "fraction",
        ),
        (
            lambda m, g: structured.prune_channels(m, jnp.zeros((1, 12)), {"nope": 0.5}),
            ValueError,
            "nope",
        ),
        (lambda m, g: structured.keep_top([np.ones(3)], 0.5, round_to=0), ValueError, "round_to"),
        (lambda m, g: structured.keep_top([np.ones(3)], [0.5, 0.5]), ValueError, "one per group"),
        (lambda m, g: structured.resized(m, {"fc9/kernel": np.ones(2)}), ValueError, "fc9"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    model = _materialize(lambda: LeNet300100(12, hidden=(5, 4), rngs=nnx.Rngs(0)))
    groups = structured.dependency_groups(model, jnp.zeros((1, 12)))
    with pytest.raises(error, match=match):
        call(model, groups)


def test_cli_slim_writes_an_archive_that_evaluate_and_inspect_read(tmp_path, capsys):
    from jaxopt_nn import archive, cli

    out = tmp_path / "slim.jnz"
    argv = ["slim", "--model", "lenet300", "--epochs", "1", "--steps", "1", "--quiet"]
    assert cli.main([*argv, "--finetune-epochs", "1", "--fraction", "0.5", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "dense" in table and "step 1 (50% removed)" in table and "speed-up b128" in table
    info = archive.inspect(out)
    assert info.metadata["structured"] is True
    shapes = {t.name: t.shape for t in info.tensors}
    assert shapes["params/fc1/kernel"] == (64, 150) and shapes["params/fc2/kernel"] == (150, 50)
    assert cli.main(["evaluate", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_cli_compress_slim_chains_structured_pruning_and_the_archive_evaluates(tmp_path, capsys):
    from jaxopt_nn import archive, cli

    out = tmp_path / "slim.jnz"
    argv = ["compress", "--model", "lenet300", "--epochs", "1", "--prune-epochs", "2"]
    argv += ["--finetune-epochs", "0", "--slim", "0.5", "--slim-epochs", "1", "--quiet"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step 3 (50% removed)" in printed and "compression " in printed
    info = archive.inspect(out)
    assert info.metadata["structured"] is True and info.metadata["fraction"] == 0.5
    shapes = {t.name: t.shape for t in info.tensors}
    assert shapes["params/fc1/kernel"] == (64, 150) and shapes["params/fc2/kernel"] == (150, 50)
    assert cli.main(["evaluate", str(out)]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_distillation_loss_mixes_cross_entropy_and_the_softened_teacher():
    teacher = _materialize(lambda: LeNet300100(6, hidden=(5, 4), rngs=nnx.Rngs(0)))
    student = _materialize(lambda: LeNet300100(6, hidden=(5, 4), rngs=nnx.Rngs(0)), seed=1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((7, 6)), jnp.float32)
    y = jnp.arange(7) % 3
    z, zt = np.asarray(student(x), np.float64), np.asarray(teacher(x), np.float64)

    def log_softmax(a):
        return (
            a
            - a.max(-1, keepdims=True)
            - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True))
        )

    ce = -log_softmax(z)[np.arange(7), np.asarray(y)].mean()
    t = 2.0
    soft = np.exp(log_softmax(zt / t))
    kd = -(soft * log_softmax(z / t)).sum(-1).mean() * t**2
    for weight in (0.0, 0.3, 1.0):
        loss, logits = structured.distillation_loss_fn(teacher, weight=weight, temperature=t)(
            student, x, y
        )
        np.testing.assert_allclose(float(loss), (1 - weight) * ce + weight * kd, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(logits), z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"weight": 1.5}, "weight"), ({"weight": 0.5, "temperature": 0.0}, "temperature")],
)
def test_distillation_arguments_are_checked(kwargs, match):
    teacher = LeNet300100(6, hidden=(5, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        structured.distillation_loss_fn(teacher, **kwargs)


def test_gradual_prune_with_distillation_shrinks_in_steps():
    from jaxopt_nn.data import load_digits

    data = load_digits()
    data = data._replace(x_train=data.x_train[:256].reshape(256, -1), y_train=data.y_train[:256])
    data = data._replace(x_test=data.x_test[:64].reshape(64, -1), y_test=data.y_test[:64])
    model = LeNet300100(64, hidden=(40, 20), rngs=nnx.Rngs(0))
    stages = structured.gradual_prune(model, data, 0.5, steps=2, epochs=1, distill=0.5)
    sizes = [(s.model.fc1.out_features, s.model.fc2.out_features) for s in stages]
    assert sizes[-1] == (20, 10) and 20 < sizes[0][0] < 40 and 10 < sizes[0][1] < 20
    assert stages[0].fraction < stages[1].fraction == 0.5
    assert model.fc1.out_features == 40  # the original is untouched
