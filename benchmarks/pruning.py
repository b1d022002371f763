"""Pruning benchmark: step-time overhead, accuracy vs sparsity, BCOO inference.

(a) train-step time of LeNet-300-100 (784 inputs, batch 128) with adam vs
    adam + prune, interleaved; prune measured on non-update steps (the common
    case of a schedule) and with a mask update on every step (layer and
    global magnitude), with bool and bit-packed mask state; and the bytes of
    the mask state.
(b) test accuracy vs sparsity of LeNet-300-100 on digits, pruned during
    training from scratch: gradual magnitude (layer, global, global
    normalised), saliency (global normalised), 4x1 blocks (4 inputs of one
    unit), random, 2:4 (only at 50%); sparse from the first step: SET and
    RigL (ERK, drop-and-grow every 10 steps until 3/4 of training) and static
    masks (the dense run's magnitude masks on the same initial weights, a
    one-shot lottery ticket). One seed per cell (3 seeds and ResNet-20 would
    take hours on this CPU).
(c) dense vs ``to_sparse`` (BCOO) inference time of the LeNet-300-100 kernels.

Run: ``python benchmarks/pruning.py [--quick]``; writes
``benchmarks/results/pruning.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jaxopt_nn import data, models, pruning, train


def _time(fn, repeats):
    """Median seconds of ``fn()`` (blocks on the result)."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out


def step_overhead(rounds: int, per_round: int) -> dict:
    model = models.LeNet300100(784, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    never = pruning.one_shot(10**9, 0.9)  # every measured step is a non-update step
    always = pruning.constant(0.9)
    variants = {
        "dense": optax.adam(1e-3),
        "prune (no mask update)": optax.chain(optax.adam(1e-3), pruning.prune(never)),
        "prune packed (no mask update)": optax.chain(
            optax.adam(1e-3), pruning.prune(never, packed=True)
        ),
        "prune (mask update every step)": optax.chain(optax.adam(1e-3), pruning.prune(always)),
        "prune global (mask update every step)": optax.chain(
            optax.adam(1e-3), pruning.prune(always, scope="global")
        ),
        "prune packed (mask update every step)": optax.chain(
            optax.adam(1e-3), pruning.prune(always, packed=True)
        ),
    }
    steps, states = {}, {}
    for name, tx in variants.items():
        graphdef, state = train.init_train_state(model, tx)
        steps[name] = train.make_train_step(graphdef, tx, donate=False)
        states[name] = steps[name](state, x, y)[0]  # compile
    times = {name: [] for name in variants}
    for _ in range(rounds):  # interleaved
        for name in variants:
            samples = _time(lambda n=name: steps[n](states[n], x, y), per_round)
            times[name].extend(samples)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        name: {"median_ms": 1e3 * m, "ratio_vs_dense": m / med["dense"]} for name, m in med.items()
    }


def mask_state_bytes() -> dict:
    """Bytes of the mask state of prune on LeNet-300-100 (784-300-100-10)."""
    params = nnx.state(models.LeNet300100(784, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    kernels = sum(v["kernel"].size for v in params.values())
    out = {"bool mask per kernel (1 byte per weight)": kernels}
    for name, packed in (("bool state", False), ("packed state", True)):
        state = pruning.prune(0.9, packed=packed).init(params)
        out[name] = sum(x.nbytes for x in jax.tree.leaves(state.masks))
    return out


def accuracy_vs_sparsity(epochs: int, sparsities: list[float]) -> list[dict]:
    ds = data.load_digits()
    steps = epochs * (len(ds.x_train) // 128)

    def model():
        return models.LeNet300100(64, rngs=nnx.Rngs(0))

    def after_adam(**kwargs):
        return lambda s: optax.chain(optax.adam(lr), pruning.prune(sched(s), **kwargs))

    lr = optax.cosine_decay_schedule(3e-3, steps)

    def fit(tx):
        result = train.fit(model(), tx, ds, epochs=epochs, progress=False)
        acc = train.evaluate(result.graphdef, result.state, ds.x_test, ds.y_test)["accuracy"]
        return float(acc), result.state.params

    def accuracy(tx):
        acc, params = fit(tx)
        return acc, pruning.sparsity_summary(params).total.sparsity

    def dynamic(method):
        # sparse from the first step, drop-and-grow every 10 steps until 3/4 of training
        return lambda s: pruning.prune(
            pruning.constant(s, frequency=10),
            method=method,
            key=jax.random.key(0),
            update_end=3 * steps // 4,
            inner=optax.adam(lr),
        )

    def sched(s):
        return pruning.polynomial_schedule(s, steps // 8, steps // 2, frequency=10)

    dense_acc, dense_params = fit(optax.adam(lr))
    rows = [{"method": "dense", "target": 0.0, "sparsity": 0.0, "accuracy": dense_acc}]
    methods = {
        "magnitude (layer)": after_adam(),
        "magnitude (global)": after_adam(scope="global"),
        "magnitude (global, normalised)": after_adam(scope="global", normalize=True),
        # saliency wraps adam: its scores need the raw gradients
        "saliency (global, normalised)": lambda s: pruning.prune(
            sched(s), method="saliency", scope="global", normalize=True, inner=optax.adam(lr)
        ),
        "magnitude 4x1 blocks (layer)": after_adam(block=(4, 1)),
        "random": after_adam(method="random", key=jax.random.key(0)),
        "SET (ERK, from scratch)": dynamic("set"),
        "RigL (ERK, from scratch)": dynamic("rigl"),
        # a one-shot lottery ticket: the dense run's magnitude masks, same initial weights
        "static (ticket of the dense run)": lambda s: optax.chain(
            optax.adam(lr),
            pruning.prune(None, method="static", masks=pruning.magnitude_masks(dense_params, s)),
        ),
    }
    for s in sparsities:
        for name, make in methods.items():
            acc, actual = accuracy(make(s))
            rows.append({"method": name, "target": s, "sparsity": actual, "accuracy": acc})
        if s == 0.5:
            acc, actual = accuracy(after_adam(method="nm", n=2, m=4, axis=0)(0.5))
            rows.append(
                {"method": "2:4 (axis 0)", "target": s, "sparsity": actual, "accuracy": acc}
            )
        print(f"  sparsity {s:.2f} done", flush=True)
    return rows


def sparse_inference(repeats: int) -> list[dict]:
    model = models.LeNet300100(784, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    x = jax.random.normal(jax.random.key(0), (128, 784))

    def forward(p, x):
        h = x
        for i, name in enumerate(("fc1", "fc2", "fc3")):
            h = h @ p[name]["kernel"] + p[name]["bias"][None, :]
            h = jax.nn.relu(h) if i < 2 else h
        return h

    fwd = jax.jit(forward)
    rows = []
    for s in (0.9, 0.95):
        dense = pruning.apply_masks(params, pruning.magnitude_masks(params, s))
        sp = pruning.to_sparse(dense)
        np.testing.assert_allclose(fwd(sp, x), fwd(dense, x), rtol=1e-4, atol=1e-4)
        t_dense, t_sparse = [], []
        for _ in range(5):  # interleaved
            t_dense += _time(lambda d=dense: fwd(d, x), repeats)
            t_sparse += _time(lambda p=sp: fwd(p, x), repeats)
        kernel_bytes = sum(v["kernel"].nbytes for v in dense.values())
        sparse_bytes = sum(
            v["kernel"].data.nbytes + v["kernel"].indices.nbytes for v in sp.values()
        )
        md, ms = statistics.median(t_dense), statistics.median(t_sparse)
        rows.append(
            {
                "sparsity": s,
                "dense_ms": 1e3 * md,
                "bcoo_ms": 1e3 * ms,
                "bcoo_over_dense": ms / md,
                "dense_kernel_bytes": kernel_bytes,
                "bcoo_kernel_bytes": int(sparse_bytes),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument("--epochs", type=int, help="epochs per accuracy run (default 40)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="targets of (b)")
    args = parser.parse_args()
    quick = args.quick
    sparsities = args.sparsities or ([0.5, 0.9] if quick else [0.5, 0.8, 0.9, 0.95, 0.98])
    epochs = args.epochs or (10 if quick else 40)
    print("(a) train-step overhead", flush=True)
    overhead = step_overhead(rounds=3 if quick else 7, per_round=10 if quick else 30)
    state_bytes = mask_state_bytes()
    print("(b) accuracy vs sparsity", flush=True)
    accuracy = accuracy_vs_sparsity(epochs, sparsities)
    print("(c) BCOO inference", flush=True)
    inference = sparse_inference(10 if quick else 40)
    result = {
        "device": str(jax.devices()[0].device_kind),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "quick": quick,
        "epochs": epochs,
        "step_overhead": overhead,
        "mask_state_bytes": state_bytes,
        "accuracy_vs_sparsity": accuracy,
        "sparse_inference": inference,
    }
    out = Path(__file__).parent / "results" / "pruning.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for name, row in overhead.items():
        print(f"{name:40s} {row['median_ms']:8.3f} ms  x{row['ratio_vs_dense']:.3f}")
    for name, nbytes in state_bytes.items():
        print(f"{name:40s} {nbytes:8d} bytes")
    for row in accuracy:
        print(
            f"{row['method']:32s} target {row['target']:.2f} actual {row['sparsity']:.4f} "
            f"acc {row['accuracy']:.4f}"
        )
    for row in inference:
        print(
            f"s={row['sparsity']:.2f} dense {row['dense_ms']:.3f} ms  "
            f"bcoo {row['bcoo_ms']:.3f} ms "
            f"(x{row['bcoo_over_dense']:.2f}); kernel bytes {row['dense_kernel_bytes']} -> "
            f"{row['bcoo_kernel_bytes']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
