"""``prune`` under a mesh with explicit axes, on 8 simulated CPU devices.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=8 python -W error
tests/parallel_scripts/explicit_mesh_prune.py [check ...]``; each check prints
``PASS <name>`` or ``FAIL <name>`` with its traceback, and the exit status is
the number of failures.
"""

import math
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_nn import pruning

jax.config.update("jax_numpy_rank_promotion", "raise")

SPECS = {"fc1": P(None, "model"), "fc2": P("model", None), "conv": P(None, None, "data", "model")}
SHAPES = {"fc1": (16, 32), "fc2": (32, 8), "conv": (3, 3, 4, 8)}
SPARSITY = 0.5
STEPS = 3
# Methods whose selection counts exactly round(SPARSITY * size) per kernel are
# checked for it; ERK (set, rigl), global and block ones for exact zeros.
METHODS = {
    "magnitude": {},
    "magnitude_global_normalized_packed": {"scope": "global", "normalize": True, "packed": True},
    "magnitude_block": {"block": (2, 4)},
    "saliency": {"method": "saliency"},
    "random": {"method": "random", "key": jax.random.key(1)},
    "nm": {"method": "nm", "n": 2, "m": 4},
    "structured": {"method": "structured"},
    "set": {"method": "set", "key": jax.random.key(2)},
    "rigl": {"method": "rigl", "key": jax.random.key(3)},
    "ste": {"method": "ste"},
    "static": {"method": "static"},
}
INNER = ("magnitude", "saliency", "rigl")


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def _params(mesh):
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in SHAPES.items():
        value = rng.integers(-4, 5, size=shape).astype(np.float32)  # many exact ties
        params[name] = {
            "kernel": jax.device_put(value, NamedSharding(mesh, SPECS[name])),
            "bias": jax.device_put(np.ones(shape[-1], np.float32), NamedSharding(mesh, P())),
        }
    return params


def _loss(params):
    return sum(
        jnp.sum(jnp.sin(layer["kernel"])) + jnp.sum(layer["bias"]) for layer in params.values()
    )


def _check_method(kwargs, inner):
    mesh = _mesh()
    sched = pruning.constant(SPARSITY, frequency=2)
    with jax.set_mesh(mesh):
        params = _params(mesh)
        if kwargs.get("method") == "static":  # a ticket: masks of the same weights
            sched, kwargs = None, {**kwargs, "masks": pruning.magnitude_masks(params, SPARSITY)}
        prune = pruning.prune(sched, inner=optax.adam(1e-2) if inner else None, **kwargs)
        tx = prune if inner else optax.chain(optax.sgd(1e-2), prune)
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            updates, state = tx.update(jax.grad(_loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        for _ in range(STEPS):
            params, state = step(params, state)
    prune_state = state if inner else state[1]
    total = sum(math.prod(s) for s in SHAPES.values())
    zeros = 0
    for name, spec in SPECS.items():
        mask = prune_state.masks[name]["kernel"]
        if kwargs.get("packed"):  # bits packed along axis 0, which is then replicated
            spec = P(None, *spec[1:])
        assert mask.sharding.spec == spec, (name, mask.sharding.spec)
        assert params[name]["kernel"].sharding.spec == SPECS[name], name
        kernel, mask = np.asarray(params[name]["kernel"]), np.asarray(mask)
        if kwargs.get("packed"):
            mask = np.unpackbits(mask, axis=0, count=kernel.shape[0]).astype(bool)
        if kwargs.get("method") != "ste":  # STE trains the dense weights
            np.testing.assert_array_equal(kernel[~mask], 0.0, err_msg=name)
        zeros += int((~mask).sum())
        if kwargs.get("scope") != "global" and kwargs.get("method") not in ("set", "rigl"):
            channels = SHAPES[name][-1]
            expected = (
                round(SPARSITY * channels) * math.prod(SHAPES[name][:-1])
                if kwargs.get("method") == "structured"
                else round(SPARSITY * mask.size)
            )
            assert int((~mask).sum()) == expected, (name, int((~mask).sum()), expected)
        assert np.asarray(prune_state.masks[name]["bias"]).all(), name
    if kwargs.get("scope") == "global":
        assert zeros == round(SPARSITY * total), zeros


def check_every_method_runs_under_an_explicit_mesh():
    for name, kwargs in METHODS.items():
        try:
            _check_method(kwargs, inner=name in INNER)
        except Exception as err:
            raise AssertionError(f"method {name}") from err


def check_masks_are_sharded_like_params_and_shrink_per_device():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = _params(mesh)
        state = pruning.prune(SPARSITY).init(params)
        specs = optax.tree.map_params(
            pruning.prune(SPARSITY), lambda leaf: jax.typeof(leaf).sharding.spec, state
        )
    for name, spec in SPECS.items():
        mask = state.masks[name]["kernel"]
        assert specs.masks[name]["kernel"] == spec, (name, specs.masks[name]["kernel"])
        shard_bytes = max(s.data.nbytes for s in mask.addressable_shards)
        devices_on_spec = math.prod(
            mesh.shape[a]
            for part in spec
            if part
            for a in (part if isinstance(part, tuple) else (part,))
        )
        assert shard_bytes * devices_on_spec == mask.nbytes, (name, shard_bytes, mask.nbytes)


def check_sparsity_stats_run_on_sharded_params():
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = _params(mesh)
        stats = jax.jit(pruning.sparsity_stats)(params)
    summary = pruning.sparsity_summary(jax.device_get(params))
    for row in summary.rows:
        assert int(stats.nonzeros[row.name]) == row.nonzeros, row


def check_packed_masks_of_sharded_1d_leaves_prune_as_bool_masks():
    mesh = _mesh()
    results = []
    with jax.set_mesh(mesh):
        params = _params(mesh)
        params["fc1"]["bias"] = jax.device_put(
            np.linspace(-1.0, 1.0, 32, dtype=np.float32), NamedSharding(mesh, P("model"))
        )
        for packed in (False, True):
            prune = pruning.prune(SPARSITY, where=lambda name, leaf: True, packed=packed)
            tx = optax.chain(optax.sgd(1e-2), prune)

            @jax.jit
            def step(params, state, tx=tx):
                updates, state = tx.update(jax.grad(_loss)(params), state, params)
                return optax.apply_updates(params, updates), state

            new, state = params, tx.init(params)
            for _ in range(STEPS):
                new, state = step(new, state)
            assert new["fc1"]["bias"].sharding.spec == P("model")
            results.append(jax.device_get(new))
    jax.tree.map(np.testing.assert_array_equal, results[0], results[1])
    assert (results[1]["fc1"]["bias"] == 0).sum() == round(SPARSITY * 32)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def main(names):
    assert jax.device_count() == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    failures = 0
    for name in names or CHECKS:
        try:
            CHECKS[name]()
            print(f"PASS {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every failing check
            failures += 1
            print(f"FAIL {name}", flush=True)
            traceback.print_exc()
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
