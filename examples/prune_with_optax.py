"""Gradual magnitude pruning inside your own optax training loop.

``jaxopt_nn.prune`` is an optax transform: chained after the optimizer, every
update both trains and prunes. LeNet-300-100 is trained on the built-in
digits with Adam; a Zhu & Gupta polynomial schedule raises the sparsity of
every kernel from 0 to 90% between epochs 5 and 20 (masks recomputed once an
epoch), and the last epochs retrain at the final masks.

Pruned weights are exactly 0.0 (``prune`` emits ``-w`` as their update), so
``sparsity_summary`` counts them, and ``to_sparse`` exports the kernels as
``BCOO`` matrices that give the same logits in sparse inference.

Run: ``python examples/prune_with_optax.py`` (about 10 seconds on a CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxopt_nn

EPOCHS, BATCH_SIZE, SPARSITY = 30, 128, 0.9


def sparse_logits(params, x):
    """LeNet-300-100 forward pass with ``BCOO`` kernels: ``x @ w`` is a sparse matmul."""
    h = jnp.asarray(x).reshape(len(x), -1)
    for layer in ("fc1", "fc2", "fc3"):
        h = h @ params[layer]["kernel"] + params[layer]["bias"][None, :]
        h = jax.nn.relu(h) if layer != "fc3" else h
    return h


def main():
    data = jaxopt_nn.load_digits()
    steps_per_epoch = len(data.x_train) // BATCH_SIZE
    schedule = jaxopt_nn.polynomial_schedule(
        SPARSITY, 5 * steps_per_epoch, 20 * steps_per_epoch, frequency=steps_per_epoch
    )
    tx = optax.chain(jaxopt_nn.adam(1e-3), jaxopt_nn.prune(schedule))
    graphdef, state = jaxopt_nn.init_train_state(jaxopt_nn.LeNet300100(64, rngs=nnx.Rngs(0)), tx)
    step = jaxopt_nn.make_train_step(graphdef, tx)  # jit-compiled, buffers donated

    for epoch in range(1, EPOCHS + 1):
        for x, y in jaxopt_nn.batches(
            data.x_train, data.y_train, BATCH_SIZE, seed=(0, epoch), drop_remainder=True
        ):
            state, metrics = step(state, x, y)
        if epoch % 5 == 0:
            sparsity = jaxopt_nn.sparsity_summary(state.params).total.sparsity
            test = jaxopt_nn.evaluate(graphdef, state, data.x_test, data.y_test)
            print(f"epoch {epoch:2d}: loss {float(metrics['loss']):.4f}, kernel sparsity "
                  f"{sparsity:.1%}, test accuracy {test['accuracy']:.2%}")  # fmt: skip

    print(f"\n{jaxopt_nn.sparsity_summary(state.params)}\n")

    # The masks live in the optimizer state: every pruned weight is exactly 0.0.
    masks = dict(jaxopt_nn.tree.leaves_with_names(state.opt_state[1].masks))
    for name, weight in jaxopt_nn.tree.leaves_with_names(state.params):
        if name in masks:
            weight, mask = np.asarray(weight), np.asarray(masks[name])
            print(f"{name}: {np.sum(~mask)} pruned, all exactly 0.0: "
                  f"{bool(np.all(weight[~mask] == 0.0))}")  # fmt: skip

    # Export: BCOO kernels hold only the nonzeros and give the dense model's logits.
    params = nnx.to_pure_dict(state.params)
    sparse = jaxopt_nn.to_sparse(params)
    kernels = [sparse[layer]["kernel"] for layer in ("fc1", "fc2", "fc3")]
    sparse_bytes = sum(k.data.nbytes + k.indices.nbytes for k in kernels)
    dense_bytes = 4 * jaxopt_nn.count_params(params, None)  # float32 kernels
    dense = jaxopt_nn.to_model(graphdef, state)(data.x_test)
    diff = float(jnp.max(jnp.abs(sparse_logits(sparse, data.x_test) - dense)))
    print(f"\nBCOO kernels: {sparse_bytes:,} bytes (dense float32 {dense_bytes:,}), "
          f"max |sparse logits - dense logits| = {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
