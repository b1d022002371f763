"""Train steps with explicit collectives under ``jax.shard_map``.

1. Data parallelism, as with ``pmap``: each device differentiates its share of
   the batch and ``pmean_gradients`` averages the gradients (``lax.pmean``
   over ``'data'``) before Adam, so every replica applies the same update.
2. A Megatron-style tensor-parallel MLP on a ``data x model`` mesh: the first
   kernel is split by columns, the second by rows, and one ``lax.psum`` over
   ``'model'`` completes the forward pass. With ``check_vma=True`` JAX tracks
   which values vary across devices, so the gradients of the replicated
   parameters come out summed over ``'data'``: the local loss is divided by
   the global batch size to make that sum the mean.

Both steps are checked against the same step on one device.

Run: ``python examples/shard_map_step.py`` (on CPU it simulates 8 devices).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # CPU only; GPUs/TPUs use the real devices

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxopt_nn import parallel, train  # noqa: E402
from jaxopt_nn.models import LeNet300100  # noqa: E402


def data_parallel_lenet(mesh, x, y):
    """LeNet-300-100 with gradients averaged by an explicit ``pmean``."""
    tx = optax.adam(1e-3)
    graphdef, state = train.init_train_state(LeNet300100(64, rngs=nnx.Rngs(0)), tx)
    local = train.make_train_step(graphdef, parallel.pmean_gradients(tx), jit=False)

    def step(state, x, y):
        state, metrics = local(state, x, y)
        return state, jax.lax.pmean(metrics, "data")

    sharded_step = jax.jit(
        jax.shard_map(
            step,
            mesh=mesh,
            in_specs=(P(), P("data"), P("data")),
            out_specs=(P(), P()),
            check_vma=False,  # per-device gradients, averaged by pmean_gradients
        )
    )
    single_step = train.make_train_step(graphdef, tx, donate=False)
    new, metrics = sharded_step(state, *parallel.global_batch((x, y), mesh))
    ref, _ = single_step(state, x, y)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params), strict=True)
    )
    print(f"data parallel LeNet-300-100: loss {float(metrics['loss']):.4f}, "
          f"max |params - single device| = {diff:.2e}")  # fmt: skip


def megatron_mlp(mesh, x, y):
    """A column- then row-parallel MLP with one ``psum`` per forward pass."""
    key1, key2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(key1, (x.shape[1], 64)) / 8.0,
        "w2": jax.random.normal(key2, (64, y.shape[1])) / 8.0,
    }
    global_batch = x.shape[0]

    def loss_fn(params, x, y, reduce):
        hidden = jax.nn.relu(x @ params["w1"])  # (local batch, 64 / model): no communication
        out = reduce(hidden @ params["w2"])  # partial sums over the hidden units -> all-reduce
        return jnp.sum((out - y) ** 2) / global_batch

    def local_grads(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, lambda v: jax.lax.psum(v, "model"))
        return jax.lax.psum(loss, "data"), grads  # grads are already summed over 'data'

    specs = {"w1": P(None, "model"), "w2": P("model", None)}
    sharded = jax.jit(
        jax.shard_map(
            local_grads,
            mesh=mesh,
            in_specs=(specs, P("data"), P("data")),
            out_specs=(P(), specs),
        )
    )
    loss, grads = sharded(params, *parallel.global_batch((x, y), mesh))
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, x, y, lambda v: v)
    diff = max(float(jnp.max(jnp.abs(grads[k] - ref_grads[k]))) for k in params)
    print(f"tensor parallel MLP ({dict(mesh.shape)}): loss {float(loss):.4f} "
          f"(single device {float(ref_loss):.4f}), max |grads - single device| = {diff:.2e}, "
          f"w1 gradient sharding {grads['w1'].sharding.spec}")  # fmt: skip


def main():
    rng = np.random.default_rng(0)
    n = 8 * jax.device_count()
    x = rng.uniform(size=(n, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, size=n).astype(np.int32)
    data_parallel_lenet(parallel.make_mesh(), x, labels)
    model = 2 if jax.device_count() % 2 == 0 else 1
    targets = rng.normal(size=(n, 4)).astype(np.float32)
    megatron_mlp(parallel.make_mesh(model=model), x.reshape(n, -1), targets)


if __name__ == "__main__":
    main()
