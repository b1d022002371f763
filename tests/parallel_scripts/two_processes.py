"""One of two processes running a data-parallel step with jax.distributed on CPU.

Usage: ``python -W error two_processes.py PROCESS_ID PORT OUT_DIR``. Each
process drives two CPU devices (four in the global mesh), feeds its half of
the batch through ``global_batch``, trains a few data-parallel steps, trains
the same steps on one local device over the whole batch, checks that the two
agree and saves both to ``OUT_DIR/process_<id>.npz``.
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxopt_nn import parallel, train, tree  # noqa: E402
from jaxopt_nn.models import LeNet300100  # noqa: E402

NUM_PROCESSES = 2
STEPS = 3
BATCH = 16


def main(process_id: int, port: int, out_dir: str) -> None:
    started = parallel.initialize(
        f"127.0.0.1:{port}", NUM_PROCESSES, process_id, initialization_timeout=60
    )
    assert started and jax.process_count() == NUM_PROCESSES, jax.process_count()
    assert jax.device_count() == 2 * NUM_PROCESSES and jax.local_device_count() == 2

    rng = np.random.default_rng(0)  # every process draws the same global batches
    x = rng.uniform(size=(STEPS, BATCH, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(STEPS, BATCH)).astype(np.int32)
    rows = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)

    tx = optax.sgd(0.1, momentum=0.9)
    model = LeNet300100(64, hidden=(32, 16), rngs=nnx.Rngs(0))
    graphdef, state = train.init_train_state(model, tx)

    with jax.default_device(jax.local_devices()[0]):
        step = train.make_train_step(graphdef, tx, donate=False)
        reference = state
        for i in range(STEPS):
            reference, _ = step(reference, x[i], y[i])
        reference = jax.device_get(reference.params)

    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": 2 * NUM_PROCESSES, "model": 1}
    dp_step = parallel.data_parallel_step(train.make_train_step(graphdef, tx, jit=False), mesh)
    for i in range(STEPS):
        xb, yb = parallel.global_batch((x[i, rows], y[i, rows]), mesh)
        assert xb.shape == (BATCH, 8, 8, 1)
        state, metrics = dp_step(state, xb, yb)
    params = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), state.params)

    names = [name for name, _ in tree.leaves_with_names(params)]
    for name, a, r in zip(names, jax.tree.leaves(params), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-7, err_msg=name)
    np.savez(
        f"{out_dir}/process_{process_id}.npz",
        **{name: a for name, a in zip(names, jax.tree.leaves(params), strict=True)},
    )
    jax.distributed.shutdown()
    print(f"process {process_id}: OK, loss {float(metrics['loss'].addressable_data(0)):.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
