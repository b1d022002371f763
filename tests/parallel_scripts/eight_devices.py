"""Multi-device checks of jaxopt_nn.parallel on 8 simulated CPU devices.

Run as ``python -W error tests/parallel_scripts/eight_devices.py [check ...]``;
each check prints ``PASS <name>`` or ``FAIL <name>`` with its traceback, and
the exit status is the number of failures. One process runs every check, so
JAX starts once.
"""

import sys
import traceback

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxopt_nn import optim, parallel, pruning, train, tree  # noqa: E402
from jaxopt_nn.models import LeNet5, LeNet300100  # noqa: E402

STEPS = 10
BATCH = 64
RTOL = 1e-5
ATOL = 1e-7
LR = 1e-3
# The optimizers data parallelism must reproduce. Adam divides by sqrt(v):
# where a gradient is as small as the rounding of its batch sum (which data
# parallelism reorders), the step's sign is noise, so Adam gets an absolute
# tolerance of 1% of one step (LR); SGD keeps the strict one.
OPTIMIZERS = {
    "sgd_momentum": (lambda: optax.sgd(0.1, momentum=0.9), ATOL),
    "optax_adam": (lambda: optax.adam(LR), 1e-2 * LR),
    "jaxopt_nn_adam": (lambda: optim.adam(LR), 1e-2 * LR),
}
RULES = parallel.tensor_parallel_rules(column=["fc1"], row=["fc2"])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(STEPS, BATCH, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(STEPS, BATCH)).astype(np.int32)
    return x, y


def _init(tx):
    return train.init_train_state(LeNet300100(64, rngs=nnx.Rngs(0)), tx)


_REFERENCES = {}


def _train_single(name, steps=STEPS):
    """The reference: plain jit on the default (single) device, computed once per optimizer.

    Returns the state after ``steps`` steps and the losses of those steps.
    """
    if name not in _REFERENCES:
        tx = OPTIMIZERS[name][0]()
        graphdef, state = _init(tx)
        step = train.make_train_step(graphdef, tx, donate=False)
        x, y = _data()
        states, losses = [], []
        for i in range(STEPS):
            state, metrics = step(state, x[i], y[i])
            states.append(state)
            losses.append(float(metrics["loss"]))
        _REFERENCES[name] = states, losses
    states, losses = _REFERENCES[name]
    return states[steps - 1], losses[:steps]


def _assert_tree_close(actual, desired, rtol=RTOL, atol=ATOL):
    actual, desired = jax.device_get((actual, desired))
    names = [name for name, _ in tree.leaves_with_names(desired)]
    for name, a, d in zip(names, jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=name)


def check_data_parallel_sharding_matches_single_device():
    for name in ["sgd_momentum", "jaxopt_nn_adam"]:
        try:
            _data_parallel_sharding(name)
        except AssertionError as err:
            raise AssertionError(f"optimizer {name}") from err


def _data_parallel_sharding(name):
    make_tx, atol = OPTIMIZERS[name]
    tx = make_tx()
    reference, ref_losses = _train_single(name)
    graphdef, state = _init(tx)
    mesh = parallel.make_mesh(data=8)
    step = parallel.data_parallel_step(train.make_train_step(graphdef, tx, jit=False), mesh)
    x, y = _data()
    losses = []
    for i in range(STEPS):
        xb, yb = parallel.global_batch((x[i], y[i]), mesh)
        assert xb.sharding.spec == P("data"), xb.sharding
        assert len({s.device for s in xb.addressable_shards}) == 8
        state, metrics = step(state, xb, yb)
        losses.append(float(metrics["loss"]))
    kernel = state.params["fc1"]["kernel"]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
    _assert_tree_close(state.params, reference.params, atol=atol)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)


def check_data_parallel_pmap_matches_single_device():
    for name in ["sgd_momentum", "optax_adam"]:
        try:
            _data_parallel_pmap(name)
        except AssertionError as err:
            raise AssertionError(f"optimizer {name}") from err


def _data_parallel_pmap(name):
    make_tx, atol = OPTIMIZERS[name]
    tx = make_tx()
    reference, ref_losses = _train_single(name)
    graphdef, state = _init(tx)
    step = parallel.pmap_train_step(graphdef, tx)
    state = parallel.replicate(state)
    x, y = _data()
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, *parallel.split_batch((x[i], y[i]), 8))
        np.testing.assert_array_equal(metrics["loss"], np.full(8, metrics["loss"][0]))
        losses.append(float(metrics["loss"][0]))
    for replica in range(8):
        replica_params = jax.tree.map(lambda a, r=replica: a[r], state.params)
        _assert_tree_close(replica_params, reference.params, atol=atol)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)


def check_shard_map_explicit_step_matches_single_device():
    tx = OPTIMIZERS["sgd_momentum"][0]()
    reference, _ = _train_single("sgd_momentum", steps=3)
    graphdef, state = _init(tx)
    mesh = parallel.make_mesh(data=8)
    inner = train.make_train_step(graphdef, parallel.pmean_gradients(tx), jit=False)

    def local_step(state, x, y):
        state, metrics = inner(state, x, y)
        return state, jax.lax.pmean(metrics, "data")

    step = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )
    x, y = _data()
    for i in range(3):
        state, _ = step(state, *parallel.global_batch((x[i], y[i]), mesh))
    _assert_tree_close(state.params, reference.params)


def _loss(graphdef, rest):
    def loss(params, x, y):
        logits = nnx.merge(graphdef, params, rest)(x)
        return train.cross_entropy_loss(logits, y), logits

    return loss


def check_tensor_parallel_forward_grads_and_shardings():
    tx = OPTIMIZERS["optax_adam"][0]()
    graphdef, state = _init(tx)
    mesh = parallel.make_mesh(data=2, model=4)
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    shardings = parallel.train_state_shardings(state, mesh, RULES)
    expected = {
        "fc1": {"kernel": P(None, "model"), "bias": P("model")},
        "fc2": {"kernel": P("model", None), "bias": P()},
        "fc3": {"kernel": P(), "bias": P()},
    }
    sharded = jax.device_put(state, shardings)
    adam = sharded.opt_state[0]
    for layer, leaves in expected.items():
        for leaf, spec in leaves.items():
            for name, values in [("params", sharded.params), ("mu", adam.mu), ("nu", adam.nu)]:
                array = values[layer][leaf]
                assert array.sharding.spec == spec, (name, layer, leaf, array.sharding)
    assert adam.count.sharding.spec == P()
    shard = sharded.params["fc1"]["kernel"].addressable_shards[0].data
    assert shard.shape == (64, 300 // 4), shard.shape
    shard = sharded.params["fc2"]["kernel"].addressable_shards[0].data
    assert shard.shape == (300 // 4, 100), shard.shape

    x, y = (a[0] for a in _data())
    grad_fn = jax.value_and_grad(_loss(graphdef, state.rest), has_aux=True)
    (loss, logits), grads = jax.jit(grad_fn)(state.params, x, y)
    xb, yb = parallel.global_batch((x, y), mesh)
    (tp_loss, tp_logits), tp_grads = jax.jit(grad_fn)(sharded.params, xb, yb)
    assert tp_grads["fc1"]["kernel"].sharding.spec == P(None, "model")
    np.testing.assert_allclose(tp_logits, logits, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(tp_loss, loss, rtol=RTOL)
    _assert_tree_close(tp_grads, grads, atol=1e-7)

    reference, _ = _train_single("optax_adam", steps=3)
    step = parallel.data_parallel_step(
        train.make_train_step(graphdef, tx, jit=False), mesh, shardings
    )
    data_x, data_y = _data()
    for i in range(3):
        sharded, _ = step(sharded, *parallel.global_batch((data_x[i], data_y[i]), mesh))
    assert sharded.params["fc2"]["kernel"].sharding.spec == P("model", None)
    assert sharded.opt_state[0].nu["fc1"]["bias"].sharding.spec == P("model")
    _assert_tree_close(sharded.params, reference.params, atol=1e-2 * LR)


def check_conv_rules_shard_output_channels_of_lenet5():
    mesh = parallel.make_mesh(data=4, model=2)
    model = LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rules = parallel.tensor_parallel_rules(conv=["conv1", "conv2"], column=["fc1"], row=["fc2"])
    sharded = parallel.shard_params(params, mesh, rules)
    assert sharded["conv1"]["kernel"].sharding.spec == P(None, None, None, "model")
    assert sharded["conv2"]["bias"].sharding.spec == P("model")
    assert sharded["conv2"]["kernel"].addressable_shards[0].data.shape == (5, 5, 20, 25)
    assert sharded["fc2"]["kernel"].sharding.spec == P("model", None)
    x, y = (a[0, :16] for a in _data())
    grad_fn = jax.jit(jax.value_and_grad(_loss(graphdef, rest), has_aux=True))
    (loss, logits), grads = grad_fn(params, x, y)
    (tp_loss, tp_logits), tp_grads = grad_fn(sharded, *parallel.global_batch((x, y), mesh))
    assert tp_grads["conv1"]["kernel"].sharding.spec == P(None, None, None, "model")
    np.testing.assert_allclose(tp_logits, logits, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(tp_loss, loss, rtol=RTOL)
    _assert_tree_close(tp_grads, grads, atol=1e-6)


def check_prune_with_adam_keeps_exact_zeros_and_sharded_masks():
    sparsity = 0.5
    tx = pruning.prune(pruning.constant(sparsity, frequency=3), inner=optim.adam(LR))
    graphdef, state = _init(tx)
    mesh = parallel.make_mesh(data=2, model=4)
    shardings = parallel.train_state_shardings(state, mesh, RULES)
    state = jax.device_put(state, shardings)
    step = parallel.data_parallel_step(
        train.make_train_step(graphdef, tx, jit=False), mesh, shardings
    )
    x, y = _data()
    for i in range(STEPS):
        state, _ = step(state, *parallel.global_batch((x[i], y[i]), mesh))
    masks, adam = state.opt_state.masks, state.opt_state.inner_state[0]
    for layer, spec in [("fc1", P(None, "model")), ("fc2", P("model", None)), ("fc3", P())]:
        mask = masks[layer]["kernel"]
        assert mask.sharding.spec == spec, (layer, mask.sharding)
        assert adam.mu[layer]["kernel"].sharding.spec == spec
        kernel = np.asarray(state.params[layer]["kernel"])
        mask = np.asarray(mask)
        assert int((~mask).sum()) == round(sparsity * mask.size), layer
        np.testing.assert_array_equal(kernel[~mask], 0.0, err_msg=layer)
        assert np.all(kernel[mask] != 0.0), layer
        np.testing.assert_array_equal(np.asarray(adam.mu[layer]["kernel"])[~mask], 0.0)


def _quantized(bits):
    return optim.BlockQuantization(bits=bits, block_size=128, min_size=1024)


def _device_bytes(tree, device):
    """Bytes of ``tree``'s shards that live on ``device``."""
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def check_quantized_adam_state_bytes_per_device_shrink_with_the_mesh():
    rng = np.random.default_rng(0)
    params = {
        "up": rng.normal(size=(64, 1024)).astype(np.float32),
        "down": rng.normal(size=(1024, 64)).astype(np.float32),
    }
    rules = [("up", P(None, "model")), ("down", P("model", None))]
    for bits in (8, 4):
        tx = optim.adam(1e-3, state_quantization=_quantized(bits))
        per_device = {}
        for model in (1, 2, 8):
            mesh = parallel.make_mesh(data=8 // model, model=model)
            shardings = parallel.param_shardings(params, mesh, rules)
            state_sh = parallel.state_shardings(jax.eval_shape(tx.init, params), params, shardings)
            state = jax.device_put(tx.init(params), state_sh)

            def step(p, s, tx=tx):
                updates, s = tx.update(p, s, p)
                return optax.apply_updates(p, updates), s

            step = jax.jit(
                step, in_shardings=(shardings, state_sh), out_shardings=(shardings, state_sh)
            )
            _, state = step(jax.device_put(params, shardings), state)
            mu = state[0].mu
            assert mu["up"].codes.sharding.spec == P(None, "model"), mu["up"].codes.sharding
            assert mu["down"].scales.sharding.spec == P("model", None)
            per_device[model] = _device_bytes(state, jax.devices()[0])
        count = 4  # the replicated int32 step count
        for model, size in per_device.items():
            expected = (per_device[1] - count) / model + count
            assert size == expected, (bits, per_device)


def check_optimizers_run_under_an_explicit_mesh_with_stable_state_types():
    from jax.sharding import AxisType, NamedSharding

    rng = np.random.default_rng(0)
    host = {
        "w": rng.normal(size=(16, 512)).astype(np.float32),
        "v": rng.normal(size=(512, 8)).astype(np.float32),
        "b": rng.normal(size=(512,)).astype(np.float32),
    }
    specs = {"w": P(None, "model"), "v": P("model", None), "b": P("model")}
    optimizers = {
        "adam 8-bit": optim.adam(1e-2, state_quantization=_quantized(8)),
        "adam 4-bit": optim.adam(1e-2, state_quantization=_quantized(4)),
        "rmsprop 8-bit": optim.rmsprop(1e-2, state_quantization=_quantized(8)),
        "adam": optim.adam(1e-2),
        "nadamw": optim.nadamw(1e-2),
        "rmsprop": optim.rmsprop(1e-2, centered=True, bias_correction=True),
    }
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    for name, tx in optimizers.items():

        def run(params, tx=tx, name=name):
            state = tx.init(params)
            types = jax.tree.map(jax.typeof, state)
            step = jax.jit(lambda p, s: tx.update(p, s, p))
            for _ in range(3):
                updates, state = step(params, state)
                params = optax.apply_updates(params, updates)
            assert jax.tree.map(jax.typeof, state) == types, name
            return params, state

        expected, _ = run(host)
        with jax.set_mesh(mesh):
            params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
            result, state = run(params)
        for k, spec in specs.items():
            assert result[k].sharding.spec == spec, (name, k, result[k].sharding)
        if "bit" in name:
            assert state[0].nu["w"].codes.sharding.spec == P(None, "model"), name
        _assert_tree_close(result, expected, rtol=1e-5, atol=1e-6)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def main(names):
    failures = 0
    for name in names or CHECKS:
        try:
            CHECKS[name]()
            print(f"PASS {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every failing check
            failures += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
