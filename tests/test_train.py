"""Tests for jaxopt_nn.train: steps against pure references, modes, donation, fit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_nn import tree
from jaxopt_nn.data import Dataset, load_digits
from jaxopt_nn.models import LeNet300100, ResNet, auxiliary_loss
from jaxopt_nn.train import (
    FitResult,
    TrainState,
    auxiliary_loss_fn,
    cross_entropy_loss,
    evaluate,
    fit,
    fit_state,
    init_train_state,
    make_eval_step,
    make_train_step,
    to_model,
)

EPS = 1e-5  # nnx.BatchNorm default epsilon


def _batch(n=8, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, classes, n), jnp.int32)


def _tiny_mlp():
    return LeNet300100(6, 3, hidden=(5, 4), rngs=nnx.Rngs(0))


def _plain(state_params):
    """nnx.State of Params -> nested dict of copies (the step donates the originals)."""
    return jax.tree.map(jnp.copy, nnx.to_pure_dict(state_params))


def _mlp_logits(p, x):
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"][None, :])
    h = jax.nn.relu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"][None, :])
    return h @ p["fc3"]["kernel"] + p["fc3"]["bias"][None, :]


def _ce(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
    for (name, a), (_, e) in zip(
        tree.leaves_with_names(actual), tree.leaves_with_names(expected), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=name)


def test_cross_entropy_matches_log_softmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    y = jnp.array([0, 3, 1, 1, 2])
    np.testing.assert_allclose(
        float(cross_entropy_loss(logits, y)), float(_ce(logits, y)), rtol=1e-6
    )


def test_train_step_equals_optax_adam_on_a_pure_reference():
    x, y = _batch()
    tx = optax.adam(1e-2)
    graphdef, state = init_train_state(_tiny_mlp(), tx)
    ref = _plain(state.params)
    ref_opt = tx.init(ref)
    step = make_train_step(graphdef, tx)

    @jax.jit
    def reference_step(ref, ref_opt):
        ref_loss, grads = jax.value_and_grad(lambda p: _ce(_mlp_logits(p, x), y))(ref)
        updates, ref_opt = tx.update(grads, ref_opt, ref)
        ref_acc = jnp.mean(jnp.argmax(_mlp_logits(ref, x), -1) == y)
        return optax.apply_updates(ref, updates), ref_opt, ref_loss, ref_acc

    for _ in range(3):
        ref, ref_opt, ref_loss, ref_acc = reference_step(ref, ref_opt)
        state, metrics = step(state, x, y)
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["accuracy"]), float(ref_acc))
    _assert_trees_close(_plain(state.params), ref)


def test_param_transform_is_differentiated_through():
    x, y = _batch()
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(_tiny_mlp(), tx)
    ref = _plain(state.params)
    double = lambda params: jax.tree.map(lambda v: 2.0 * v, params)  # noqa: E731
    step = make_train_step(graphdef, tx, param_transform=double)
    state, metrics = step(state, x, y)
    ref_loss, grads = jax.value_and_grad(lambda p: _ce(_mlp_logits(double(p), x), y))(ref)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_loss), rtol=1e-5)
    _assert_trees_close(_plain(state.params), jax.tree.map(lambda p, g: p - 0.1 * g, ref, grads))
    metrics = make_eval_step(graphdef, param_transform=double)(state, x, y)
    expected = _ce(_mlp_logits(double(_plain(state.params)), x), y)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)


def test_loss_fn_hook_replaces_the_objective():
    x, y = _batch()
    graphdef, state = init_train_state(_tiny_mlp(), optax.sgd(0.1))
    graphdef, twin = init_train_state(_tiny_mlp(), optax.sgd(0.2))

    def doubled(model, x, y):
        logits = model(x)
        return 2.0 * cross_entropy_loss(logits, y), logits

    state, metrics = make_train_step(graphdef, optax.sgd(0.1), loss_fn=doubled)(state, x, y)
    twin, twin_metrics = make_train_step(graphdef, optax.sgd(0.2))(twin, x, y)
    np.testing.assert_allclose(float(metrics["loss"]), 2.0 * float(twin_metrics["loss"]), rtol=1e-6)
    _assert_trees_close(_plain(state.params), _plain(twin.params))


class _LinearBatchNorm(nnx.Module):
    def __init__(self, *, rngs):
        self.fc1 = nnx.Linear(6, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.bn(self.fc1(x))))


def _bn_logits(p, x, mean, var):
    h = x @ p["fc1"]["kernel"] + p["fc1"]["bias"][None, :]
    h = (h - mean[None, :]) / jnp.sqrt(var[None, :] + EPS) * p["bn"]["scale"][None, :] + p["bn"][
        "bias"
    ][None, :]
    return jax.nn.relu(h) @ p["fc2"]["kernel"] + p["fc2"]["bias"][None, :]


@pytest.mark.parametrize("mode_before_split", ["train", "eval"])
def test_train_step_uses_batch_statistics_and_eval_step_running_averages(mode_before_split):
    x, y = _batch(n=16)
    model = _LinearBatchNorm(rngs=nnx.Rngs(0))
    getattr(model, mode_before_split)()  # the steps must not depend on it
    tx = optax.sgd(0.0)  # keep the params fixed: only the statistics move
    graphdef, state = init_train_state(model, tx)
    p = _plain(state.params)
    h = np.asarray(x @ p["fc1"]["kernel"] + p["fc1"]["bias"][None, :])
    state, metrics = make_train_step(graphdef, tx)(state, x, y)
    expected_train = _ce(_bn_logits(p, x, jnp.asarray(h.mean(0)), jnp.asarray(h.var(0))), y)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected_train), rtol=1e-5)
    rest = nnx.to_pure_dict(state.rest)
    np.testing.assert_allclose(rest["bn"]["mean"], 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rest["bn"]["var"], 0.9 + 0.1 * h.var(0), rtol=1e-5)
    expected_eval = _ce(
        _bn_logits(p, x, jnp.asarray(rest["bn"]["mean"]), jnp.asarray(rest["bn"]["var"])), y
    )
    eval_metrics = make_eval_step(graphdef)(state, x, y)
    np.testing.assert_allclose(float(eval_metrics["loss"]), float(expected_eval), rtol=1e-5)
    assert abs(float(expected_eval) - float(expected_train)) > 1e-3  # the modes differ
    np.testing.assert_allclose(
        evaluate(graphdef, state, x, y)["loss"], float(expected_eval), rtol=1e-5
    )
    rebuilt = to_model(graphdef, state)
    np.testing.assert_allclose(float(_ce(rebuilt(x), y)), float(expected_eval), rtol=1e-5)


def test_donated_state_is_consumed_and_the_model_stays_usable():
    x, y = _batch()
    model = _tiny_mlp()
    before = np.asarray(model(x))
    graphdef, state = init_train_state(model, optax.sgd(0.1))
    old_kernel = state.params["fc1"]["kernel"][...]
    new_state, _ = make_train_step(graphdef, optax.sgd(0.1))(state, x, y)
    assert old_kernel.is_deleted()
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    kept_kernel = new_state.params["fc1"]["kernel"][...]
    make_train_step(graphdef, optax.sgd(0.1), donate=False)(new_state, x, y)
    assert not kept_kernel.is_deleted()


def test_unjitted_step_is_the_same_function():
    x, y = _batch()
    tx = optax.adam(1e-2)
    graphdef, a = init_train_state(_tiny_mlp(), tx)
    _, b = init_train_state(_tiny_mlp(), tx)
    a, ma = make_train_step(graphdef, tx)(a, x, y)
    plain = make_train_step(graphdef, tx, jit=False)
    assert not hasattr(plain, "lower")  # a plain function, for the caller's own jit
    b, mb = jax.jit(plain)(b, x, y)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    _assert_trees_close(_plain(a.params), _plain(b.params))
    plain_eval = make_eval_step(graphdef, jit=False)
    assert not hasattr(plain_eval, "lower")
    em = jax.jit(plain_eval)(b, x, y)
    np.testing.assert_allclose(
        float(em["loss"]), float(_ce(_mlp_logits(_plain(b.params), x), y)), rtol=1e-5
    )


def _materialize(make, seed=0):
    """Build ``make()`` abstractly and fill it with random values (no init compiles)."""
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


def test_auxiliary_loss_fn_adds_the_weighted_head_losses():
    make = lambda: ResNet(8, 3, width=2, in_channels=1, aux_heads=True, rngs=nnx.Rngs(0))  # noqa: E731
    model = _materialize(make)  # the same values as the reference's copy
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((6, 4, 4, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)

    @nnx.jit
    def reference(model, x, y):
        model.train()
        logits, aux = model(x, return_aux=True)
        return cross_entropy_loss(logits, y), [cross_entropy_loss(a, y) for a in aux]

    main, aux = reference(_materialize(make), x, y)
    assert len(aux) == 2
    tx = optax.sgd(0.0)
    graphdef, state = init_train_state(model, tx)
    step = make_train_step(graphdef, tx, loss_fn=auxiliary_loss_fn(lam=0.5), jit=False)
    _, metrics = jax.jit(step)(state, x, y)
    np.testing.assert_allclose(
        float(metrics["loss"]), float(auxiliary_loss(main, aux, 0.5)), rtol=1e-5
    )
    np.testing.assert_allclose(
        float(metrics["loss"]), float(main) + 0.5 * float(sum(aux)), rtol=1e-5
    )
    with pytest.raises(ValueError, match="lam must be >= 0; got lam=-1"):
        auxiliary_loss_fn(lam=-1)


def test_lenet300100_reaches_95_percent_on_digits():
    data = load_digits()
    result = fit(
        LeNet300100(64, rngs=nnx.Rngs(0)), optax.adam(1e-3), data, epochs=20, progress=False
    )
    assert isinstance(result, FitResult) and isinstance(result.state, TrainState)
    final = result.history[-1]
    assert final["test_accuracy"] >= 0.95
    assert final["train_loss"] < result.history[0]["train_loss"]
    # The history's numbers are the model's: recompute them independently.
    logits = _mlp_logits(_plain(result.state.params), jnp.asarray(data.x_test.reshape(-1, 64)))
    accuracy = np.mean(np.argmax(np.asarray(logits), -1) == data.y_test)
    np.testing.assert_allclose(final["test_accuracy"], accuracy, rtol=1e-6)
    np.testing.assert_allclose(
        final["test_loss"], float(_ce(logits, jnp.asarray(data.y_test))), rtol=1e-5
    )


def _toy_dataset(n_train=20, n_test=7):
    rng = np.random.default_rng(0)
    return Dataset(
        rng.normal(size=(n_train, 6, 1, 1)).astype(np.float32),
        rng.integers(0, 3, n_train).astype(np.int32),
        rng.normal(size=(n_test, 6, 1, 1)).astype(np.float32),
        rng.integers(0, 3, n_test).astype(np.int32),
    )


def test_fit_is_deterministic_calls_back_and_draws_progress(capsys):
    data = _toy_dataset()
    seen = []
    callback = lambda epoch, record, state: seen.append((epoch, record["epoch"], type(state)))  # noqa: E731
    run = lambda **kw: fit(_tiny_mlp(), optax.sgd(0.1), data, epochs=3, batch_size=8, **kw)  # noqa: E731
    a = run(progress=False, callback=callback)
    assert seen == [(e, e, TrainState) for e in (1, 2, 3)]
    assert capsys.readouterr().err == ""
    b = run(progress=True, seed=0)
    assert "epoch 3/3" in capsys.readouterr().err
    c = run(progress=False, seed=1)
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    assert [r["train_loss"] for r in a.history] != [r["train_loss"] for r in c.history]
    np.testing.assert_allclose(
        a.history[-1]["test_accuracy"],
        evaluate(a.graphdef, a.state, data.x_test, data.y_test, batch_size=3)["accuracy"],
        rtol=1e-6,
    )


def test_fit_with_a_batch_larger_than_the_data_takes_one_full_batch_and_no_test_set():
    data = _toy_dataset(n_train=5, n_test=0)
    tx = optax.sgd(0.1)
    result = fit(_tiny_mlp(), tx, data, epochs=2, batch_size=128, progress=False)
    assert np.isnan(result.history[-1]["test_accuracy"])  # no test examples
    graphdef, state = init_train_state(_tiny_mlp(), tx)
    step = make_train_step(graphdef, tx)
    x, y = data.x_train, data.y_train
    for _ in range(2):  # every epoch is one step on all five examples (order is irrelevant)
        state, _ = step(state, x, y)
    _assert_trees_close(_plain(result.state.params), _plain(state.params), rtol=1e-5, atol=1e-6)


def test_fit_refuses_an_empty_training_set():
    with pytest.raises(ValueError, match="data must have training examples; got 0 in data.x_train"):
        fit(_tiny_mlp(), optax.sgd(0.1), _toy_dataset(n_train=0), epochs=1, progress=False)


def test_fit_state_continues_from_a_state_with_reparametrised_params():
    data = _toy_dataset()
    kwargs = dict(epochs=2, batch_size=8, progress=False)
    direct = fit(_tiny_mlp(), optax.sgd(0.4), data, **kwargs)
    same = fit_state(*init_train_state(_tiny_mlp(), optax.sgd(0.4)), optax.sgd(0.4), data, **kwargs)
    assert [r["train_loss"] for r in same.history] == [r["train_loss"] for r in direct.history]
    # Train q = p / 2 through p = 2 q: dL/dq = 2 dL/dp, so sgd(0.1) on q is sgd(0.4) on p.
    tx = optax.sgd(0.1)
    graphdef, state = init_train_state(_tiny_mlp(), tx)
    halved = jax.tree.map(lambda v: 0.5 * v, state.params)
    double = lambda params: jax.tree.map(lambda v: 2.0 * v, params)  # noqa: E731
    state = TrainState(halved, state.rest, tx.init(halved))
    result = fit_state(graphdef, state, tx, data, param_transform=double, **kwargs)
    for got, want in zip(result.history, direct.history, strict=True):
        np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(got["test_loss"], want["test_loss"], rtol=1e-5)
    _assert_trees_close(_plain(double(result.state.params)), _plain(direct.state.params))


def test_evaluate_weights_uneven_batches_by_size():
    x, y = _batch(n=10)
    graphdef, state = init_train_state(_tiny_mlp(), optax.sgd(0.1))
    logits = _mlp_logits(_plain(state.params), x)
    got = evaluate(graphdef, state, x, y, batch_size=4)
    np.testing.assert_allclose(got["loss"], float(_ce(logits, y)), rtol=1e-5)
    np.testing.assert_allclose(
        got["accuracy"], np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(y))
    )


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda d: fit(_tiny_mlp(), optax.sgd(0.1), d, epochs=0, progress=False),
            "epochs must be a positive int; got epochs=0",
        ),
        (
            lambda d: fit(_tiny_mlp(), optax.sgd(0.1), d, epochs=1, batch_size=0, progress=False),
            "batch_size must be a positive int; got batch_size=0",
        ),
        (
            lambda d: evaluate(
                *init_train_state(_tiny_mlp(), optax.sgd(0.1)), d.x_test, d.y_test, batch_size=-2
            ),
            "batch_size must be a positive int; got batch_size=-2",
        ),
        (
            lambda d: evaluate(
                *init_train_state(_tiny_mlp(), optax.sgd(0.1)), d.x_test[:0], d.y_test[:0]
            ),
            r"x must hold at least one example",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(_toy_dataset())


def test_progress_bar_names_its_stage(capsys):
    data = _toy_dataset()
    fit(_tiny_mlp(), optax.sgd(0.1), data, epochs=1, batch_size=8, stage="pruning")
    err = capsys.readouterr().err
    assert "pruning" in err and "epoch 1/1" in err and "training" not in err
    with pytest.raises(TypeError, match="stage must be a str; got stage=3"):
        fit(_tiny_mlp(), optax.sgd(0.1), data, epochs=1, stage=3, progress=False)
