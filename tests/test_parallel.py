"""Tests of jaxopt_nn.parallel.

In this process (two CPU devices, see conftest): meshes, partition rules,
state shardings, the data-parallel wrappers and argument checks. The checks
that need eight devices or two processes run in subprocesses
(``tests/parallel_scripts``) so that JAX can be configured before it starts.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_nn import parallel, train, tree
from jaxopt_nn.quantization import Codebook

SCRIPTS = Path(__file__).parent / "parallel_scripts"
REPO = Path(__file__).parent.parent


def _params():
    return {
        "fc1": {"kernel": jnp.ones((4, 8)), "bias": jnp.ones(8)},
        "fc2": {"kernel": jnp.ones((8, 2)), "bias": jnp.ones(2)},
        "scale": jnp.ones(()),
    }


# ------------------------------------------------------------------ meshes


def test_make_mesh_default_uses_every_device_on_data_axis():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    assert set(mesh.devices.flat) == set(jax.devices())
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_infers_data_from_model():
    mesh = parallel.make_mesh(model=2)
    assert dict(mesh.shape) == {"data": 1, "model": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model": 0}, "model must be a positive int; got model=0"),
        ({"data": 0}, "data must be a positive int or -1; got data=0"),
        ({"data": -2}, "data must be a positive int or -1; got data=-2"),
        ({"model": 3}, r"model must divide the number of devices \(2\); got model=3"),
        ({"data": 2, "model": 2}, r"data \* model must equal .* got data=2, model=2"),
    ],
)
def test_make_mesh_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(**kwargs)


# ----------------------------------------------------------- partition rules


def test_tensor_parallel_rules_give_megatron_column_then_row_specs():
    specs = parallel.partition_specs(
        _params(), parallel.tensor_parallel_rules(column=["fc1"], row=["fc2"])
    )
    assert specs["fc1"]["kernel"] == P(None, "model")
    assert specs["fc1"]["bias"] == P("model")
    assert specs["fc2"]["kernel"] == P("model", None)
    assert specs["fc2"]["bias"] == P()
    assert specs["scale"] == P()


def test_layer_rules_match_whole_path_components_only():
    params = {"fc1": {"kernel": jnp.ones((2, 4))}, "fc10": {"kernel": jnp.ones((2, 4))},
              "blocks": [{"fc1": {"kernel": jnp.ones((2, 4))}}]}  # fmt: skip
    specs = parallel.partition_specs(params, parallel.tensor_parallel_rules(column=["fc1"]))
    assert specs["fc1"]["kernel"] == P(None, "model")
    assert specs["blocks"][0]["fc1"]["kernel"] == P(None, "model")
    assert specs["fc10"]["kernel"] == P()


def test_conv_rule_shards_last_axis_whatever_the_kernel_rank():
    params = {"c1": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
              "c2": {"kernel": jnp.ones((3, 2, 4))}}  # fmt: skip
    specs = parallel.partition_specs(params, parallel.tensor_parallel_rules(conv=["c1", "c2"]))
    assert specs["c1"]["kernel"] == P(None, None, None, "model")
    assert specs["c1"]["bias"] == P("model")
    assert specs["c2"]["kernel"] == P(None, None, "model")


def test_first_matching_rule_wins_and_scalars_stay_replicated():
    rules = [("fc1/kernel", P("data")), ("kernel", P(None, "model")), ("scale", P("model"))]
    specs = parallel.partition_specs(_params(), rules)
    assert specs["fc1"]["kernel"] == P("data")
    assert specs["fc2"]["kernel"] == P(None, "model")
    assert specs["scale"] == P()


def test_partition_specs_work_on_nnx_state_paths():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    specs = parallel.partition_specs(params, [(r"layers/0/kernel$", P(None, "model"))])
    assert [s for _, s in tree.leaves_with_names(specs)] == [P(), P(None, "model")]


def test_spec_longer_than_leaf_rank_raises():
    with pytest.raises(ValueError, match=r"spec=.* with 3 entries to 'fc1/bias' .* ndim=1"):
        parallel.partition_specs(_params(), [("fc1/bias", P(None, None, "model"))])


def test_shard_params_places_leaves_as_rules_say():
    mesh = parallel.make_mesh(data=1, model=2)
    rules = parallel.tensor_parallel_rules(column=["fc1"], row=["fc2"])
    sharded = parallel.shard_params(_params(), mesh, rules)
    kernel = sharded["fc1"]["kernel"]
    assert kernel.sharding == NamedSharding(mesh, P(None, "model"))
    assert [s.data.shape for s in kernel.addressable_shards] == [(4, 4), (4, 4)]
    assert sharded["fc2"]["bias"].sharding.is_fully_replicated
    np.testing.assert_array_equal(kernel, _params()["fc1"]["kernel"])


def test_param_shardings_rejects_unknown_axis():
    with pytest.raises(ValueError, match=r"names axis 'tensor'; the mesh has axes \('data', "):
        parallel.param_shardings(_params(), parallel.make_mesh(), [("fc1/kernel", P("tensor"))])


def test_param_shardings_rejects_indivisible_dimension():
    mesh = parallel.make_mesh(data=1, model=2)
    with pytest.raises(ValueError, match=r"'fc2/bias' of shape \(3,\) .*dimension 3 is not div"):
        parallel.param_shardings({"fc2": {"bias": jnp.ones(3)}}, mesh, [("bias", P("model"))])


# --------------------------------------------------------- state shardings


def test_adam_moments_follow_params_and_count_is_replicated():
    mesh = parallel.make_mesh(data=1, model=2)
    params = _params()
    shardings = parallel.param_shardings(
        params, mesh, parallel.tensor_parallel_rules(column=["fc1"], row=["fc2"])
    )
    opt = parallel.state_shardings(optax.adam(1e-3).init(params), params, shardings)
    assert opt[0].count.spec == P()
    for moment in (opt[0].mu, opt[0].nu):
        assert jax.tree.map(lambda s: s.spec, moment) == jax.tree.map(lambda s: s.spec, shardings)


def test_codebook_and_mask_states_follow_their_param_by_path_and_shape():
    mesh = parallel.make_mesh(data=1, model=2)
    params = _params()
    shardings = parallel.param_shardings(params, mesh, [("fc1/kernel", P(None, "model"))])
    kernel = params["fc1"]["kernel"]
    state = {
        "masks": {"fc1": {"kernel": kernel > 0}},
        "codebooks": {
            "fc1": {
                "kernel": Codebook(
                    jnp.zeros(8), jnp.zeros(kernel.shape, jnp.uint8), jnp.ones(kernel.shape, bool)
                )
            }
        },
        "blocks": {"fc1": {"kernel": jnp.zeros((2, 16))}},  # another shape: replicated
    }
    out = parallel.state_shardings(state, params, shardings)
    assert out["masks"]["fc1"]["kernel"].spec == P(None, "model")
    assert out["codebooks"]["fc1"]["kernel"].indices.spec == P(None, "model")
    assert out["codebooks"]["fc1"]["kernel"].mask.spec == P(None, "model")
    assert out["codebooks"]["fc1"]["kernel"].centroids.spec == P()
    assert out["blocks"]["fc1"]["kernel"].spec == P()


def test_state_follows_the_longest_matching_param_path():
    mesh = parallel.make_mesh(data=1, model=2)
    params = {"kernel": jnp.ones((2, 2)), "inner": {"kernel": jnp.ones((2, 2))}}
    shardings = parallel.param_shardings(params, mesh, [("inner/kernel", P("model"))])
    out = parallel.state_shardings({"mu": params}, params, shardings)
    assert out["mu"]["inner"]["kernel"].spec == P("model")
    assert out["mu"]["kernel"].spec == P()


def test_state_shardings_without_params_raises():
    with pytest.raises(ValueError, match="params must have at least one leaf"):
        parallel.state_shardings({"count": jnp.zeros(())}, {}, {})


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["a", "b", "dense", "conv_0", "kernel"]),
        st.tuples(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, 1, 2])),
        min_size=1,
    )
)
def test_any_optax_state_follows_param_shardings(layers):
    mesh = parallel.make_mesh(data=1, model=2)
    choices = [P(), P("model"), P(None, "model")]
    params = {name: {"w": jnp.ones((2 * r, 2 * c))} for name, (r, c, _) in layers.items()}
    rules = [(f"^{name}/w$", choices[k]) for name, (_, _, k) in layers.items()]
    shardings = parallel.param_shardings(params, mesh, rules)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3), optax.ema(0.9))
    state = jax.eval_shape(tx.init, params)
    out = parallel.state_shardings(state, params, shardings)
    specs = {name: shardings[name]["w"].spec for name in params}
    followed = [
        (name.split("/")[-2], s.spec)
        for name, s in tree.leaves_with_names(out)
        if name.endswith("/w")
    ]
    assert followed and all(spec == specs[layer] for layer, spec in followed)


def test_train_state_shardings_cover_params_rest_and_opt_state():
    model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)))
    _, state = train.init_train_state(model, optax.adam(1e-3))
    mesh = parallel.make_mesh(data=1, model=2)
    rules = [(r"layers/0/kernel$", P(None, "model")), (r"layers/1/(mean|var)$", P("model"))]
    sh = parallel.train_state_shardings(state, mesh, rules)
    assert isinstance(sh, train.TrainState)
    assert sh.params["layers"][0]["kernel"].spec == P(None, "model")
    assert sh.rest["layers"][1]["mean"].spec == P("model")
    assert sh.opt_state[0].nu["layers"][0]["kernel"].spec == P(None, "model")
    placed = jax.device_put(state, sh)
    assert placed.rest["layers"][1]["var"].sharding.spec == P("model")


# -------------------------------------------------------- data parallelism


def _regression_step(state, x, y):
    def loss(w):
        return jnp.mean((x @ w - y) ** 2)

    value, grad = jax.value_and_grad(loss)(state)
    return state - 0.1 * grad, {"loss": value}


def _regression_data(n=8):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 3)).astype(np.float32), rng.normal(size=n).astype(np.float32)


@pytest.mark.parametrize("donate", [False, True])
def test_data_parallel_step_matches_single_device(donate):
    x, y = _regression_data()
    mesh = parallel.make_mesh()
    step = parallel.data_parallel_step(_regression_step, mesh, donate=donate)
    w, ref = jnp.zeros(3), jnp.zeros(3)
    for _ in range(3):
        w, metrics = step(w, *parallel.global_batch((x, y), mesh))
        ref, ref_metrics = jax.jit(_regression_step)(ref, x, y)
    assert w.sharding.is_fully_replicated
    assert metrics["loss"].sharding.is_fully_replicated
    np.testing.assert_allclose(w, ref, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)


def test_data_parallel_step_keeps_state_shardings():
    x, y = _regression_data()
    mesh = parallel.make_mesh(data=1, model=2)
    sharding = NamedSharding(mesh, P(None, "model"))
    step = parallel.data_parallel_step(
        lambda w, x, y: _regression_step(w, x, y[:, None] * jnp.ones((1, 4))), mesh, sharding
    )
    w, _ = step(jnp.zeros((3, 4)), x, y)
    assert w.sharding == sharding


def test_data_parallel_step_rejects_unknown_axis():
    with pytest.raises(
        ValueError, match="data_axis must be one of the mesh axes .*; got data_axis='batch'"
    ):
        parallel.data_parallel_step(_regression_step, parallel.make_mesh(), data_axis="batch")


def test_global_batch_on_one_process_places_the_whole_batch():
    x, y = _regression_data()
    mesh = parallel.make_mesh()
    xb, yb = parallel.global_batch((x, y), mesh)
    assert xb.sharding == NamedSharding(mesh, P("data"))
    assert [s.data.shape for s in xb.addressable_shards] == [(4, 3), (4, 3)]
    np.testing.assert_array_equal(xb, x)
    np.testing.assert_array_equal(yb, y)


def test_pmean_gradients_feeds_inner_the_replica_mean():
    grads = jnp.array([[1.0, -2.0], [3.0, 0.5]])
    params = jnp.array([0.1, 0.2])
    tx = parallel.pmean_gradients(optax.adam(0.1))
    update = jax.pmap(lambda g: tx.update(g, tx.init(params), params), axis_name="data")
    updates, state = update(grads)
    ref_updates, ref_state = optax.adam(0.1).update(grads.mean(0), optax.adam(0.1).init(params))
    for replica in range(2):
        np.testing.assert_allclose(updates[replica], ref_updates, rtol=1e-6)
        np.testing.assert_allclose(state[0].mu[replica], ref_state[0].mu, rtol=1e-6)
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(ref_state)


def test_pmap_train_step_averages_batch_stats_and_metrics_over_replicas():
    def make():
        return nnx.Sequential(
            nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
            nnx.Linear(4, 2, rngs=nnx.Rngs(1)),
        )  # fmt: skip

    x, _ = _regression_data()
    y = (x[:, 0] > 0).astype(np.int32)
    tx = optax.sgd(0.1)
    graphdef, state = train.init_train_state(make(), tx)
    ref, _ = train.make_train_step(graphdef, tx, donate=False)(state, x, y)
    step = parallel.pmap_train_step(graphdef, tx)
    out, metrics = step(parallel.replicate(state), *parallel.split_batch((x, y), 2))
    # The running mean is linear in the batch mean, so the replica average of
    # per-replica updates equals the single-device update over the whole batch.
    mean = out.rest["layers"][1]["mean"]
    np.testing.assert_array_equal(mean[0], mean[1])
    np.testing.assert_allclose(mean[0], ref.rest["layers"][1]["mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(metrics["loss"][0], metrics["loss"][1])
    for leaf in jax.tree.leaves(out.params):
        np.testing.assert_array_equal(leaf[0], leaf[1])


class _DropoutNet(nnx.Module):
    def __init__(self):
        self.hidden = nnx.Linear(3, 16, rngs=nnx.Rngs(0))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=7))
        self.out = nnx.Linear(16, 2, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x))))


def test_pmap_train_step_draws_dropout_per_replica_and_keeps_keys_equal():
    x, _ = _regression_data()
    x = x[:8]
    y = (x[:, 0] > 0).astype(np.int32)
    tx = optax.sgd(0.1)
    graphdef, state = train.init_train_state(_DropoutNet(), tx)
    step = parallel.pmap_train_step(graphdef, tx, donate=False)
    out, _ = step(parallel.replicate(state), *parallel.split_batch((x, y), 2))

    # Reference: replica i is one device whose RNG key has i folded in; SGD
    # on the mean gradient is the mean of the per-replica SGD results.
    single = train.make_train_step(graphdef, tx, donate=False)
    results = []
    for i, (xb, yb) in enumerate(zip(np.split(x, 2), np.split(y, 2), strict=True)):
        folded = jax.tree.map(
            lambda v, i=i: (
                jax.tree.map(lambda k: jax.random.fold_in(k, i), v)
                if isinstance(v, nnx.RngKey)
                else v
            ),
            state.rest,
            is_leaf=lambda v: isinstance(v, nnx.Variable),
        )
        results.append(single(state._replace(rest=folded), xb, yb)[0])
    expected = jax.tree.map(lambda a, b: (a + b) / 2, results[0].params, results[1].params)
    for got, want in zip(jax.tree.leaves(out.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(got[0], got[1])
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-7)
    keys = jax.random.key_data(out.rest["dropout"]["rngs"]["key"][...])
    np.testing.assert_array_equal(keys[0], keys[1])
    np.testing.assert_array_equal(
        keys[0], jax.random.key_data(state.rest["dropout"]["rngs"]["key"][...])
    )
    counts = out.rest["dropout"]["rngs"]["count"][...]
    assert counts[0] == counts[1] == state.rest["dropout"]["rngs"]["count"][...] + 1


def test_replicate_and_unreplicate_round_trip():
    tree = {"w": jnp.arange(3.0), "n": jnp.zeros((), jnp.int32)}
    rep = parallel.replicate(tree)
    assert rep["w"].shape == (2, 3) and rep["n"].shape == (2,)
    assert len(rep["w"].sharding.device_set) == 2
    out = parallel.unreplicate(rep)
    np.testing.assert_array_equal(out["w"], tree["w"])
    assert out["n"].dtype == jnp.int32


def test_split_batch_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="num_devices must divide the batch size 5; got num_d"):
        parallel.split_batch(np.zeros((5, 2)), 2)


# ------------------------------------------------------------ initialize


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_initialize_is_a_no_op_on_one_process(clean_env):
    assert parallel.initialize() is False
    assert parallel.initialize(num_processes=1) is False
    clean_env.setenv("JAX_NUM_PROCESSES", "1")
    assert parallel.initialize() is False
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    "kwargs, env, match",
    [
        ({"num_processes": 0}, {}, "num_processes must be >= 1; got num_processes=0"),
        ({"cpu_collectives": "nccl"}, {}, "cpu_collectives must be 'gloo', 'mpi' or None; got"),
        (
            {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2},
            {},
            re.escape("process_id must lie in [0, 2); got process_id=2"),
        ),
        ({"num_processes": 2}, {}, "must be given together; got coordinator_address=None"),
        ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "num_processes=2, process_id=0"),
        (
            {},
            {"JAX_NUM_PROCESSES": "two"},
            "JAX_NUM_PROCESSES must be an integer; got JAX_NUM_PROC",
        ),
        (
            {},
            {"JAX_PROCESS_ID": "0.5"},
            "JAX_PROCESS_ID must be an integer; got JAX_PROCESS_ID='0.5'",
        ),
    ],
)
def test_initialize_rejects_bad_configuration(clean_env, kwargs, env, match):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        parallel.initialize(**kwargs)


# ------------------------------------------------------------ subprocesses


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def test_eight_device_data_tensor_pmap_and_pruning_checks():
    """8 CPU devices: DP (sharding, pmap, shard_map) and 2x4 tensor parallelism == one device.

    See tests/parallel_scripts/eight_devices.py for the checks.
    """
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPTS / "eight_devices.py")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    report = proc.stdout + proc.stderr
    passed = re.findall(r"^PASS (\w+)", proc.stdout, re.M)
    assert proc.returncode == 0, report
    assert len(passed) == 8, report


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_agree_with_one_process(tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-W",
                "error",
                str(SCRIPTS / "two_processes.py"),
                str(i),
                str(port),
                str(tmp_path),
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=150)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i}:\n{outputs[i]}"
    first, second = (np.load(tmp_path / f"process_{i}.npz") for i in range(2))
    assert sorted(first.files) == ["fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel",
                                   "fc3/bias", "fc3/kernel"]  # fmt: skip
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_moments_follow_their_param(bits):
    from jaxopt_nn import optim

    mesh = parallel.make_mesh(data=1, model=2)
    params = {"row": jnp.ones((4, 256)), "col": jnp.ones((8, 256)), "odd": jnp.ones((6, 6))}
    rules = [("row", P("model", None)), ("col", P(None, "model")), ("odd", P(None, "model"))]
    shardings = parallel.param_shardings(params, mesh, rules)
    quant = optim.BlockQuantization(bits=bits, block_size=128, min_size=16)
    state = jax.eval_shape(optim.adam(1e-3, state_quantization=quant).init, params)
    out = parallel.state_shardings(state, params, shardings)
    for moment in (out[0].mu, out[0].nu):
        assert moment["row"].codes.spec == P("model", None)
        assert moment["row"].scales.spec == P("model", None)
        assert moment["col"].codes.spec == P(None, "model")  # 256 or 128 codes per row
        assert moment["col"].scales.spec == P(None, "model")  # 2 blocks per row
        # 6 columns: one block per row, which two devices cannot split.
        assert moment["odd"].scales.spec == P(None, None)
    placed = jax.device_put(optim.adam(1e-3, state_quantization=quant).init(params), out)
    codes = placed[0].mu["col"].codes
    assert codes.addressable_shards[0].data.shape == (8, codes.shape[1] // 2)
