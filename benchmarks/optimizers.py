"""Step time of jaxopt_nn's Adam/RMSprop vs optax's, memory traffic, 8-bit and 4-bit state.

Each variant is a jitted, donated ``update + apply_updates`` step on a pytree of
a few large float32 leaves (~10M parameters; ``--quick``: ~2.5M). Variants run
interleaved, round-robin, with an ``np.copyto`` of a buffer of the same total
size measured in the same loop, so machine load hits all of them alike. The
memory traffic of a step is the minimum it must read and write (params,
grads, moments, scales), reported as a fraction of the copy bandwidth (bytes
read + written per second); XLA's own count (``cost_analysis``) is reported
next to it. Quantized variants are compared with float32 Adam (RMSprop with
float32 RMSprop): the ratio is the median over rounds of the two times
measured in the same round. Each step's process CPU time (all threads) is
recorded too: on a machine shared with other jobs it moves less with the
load than the wall time. The load average is recorded before and after.

It then trains LeNet-300-100 on digits with float32, 8-bit and 4-bit Adam
(same seed, epochs and batches) and reports their test accuracies.

    python benchmarks/optimizers.py [--quick] [--repeats N] [--epochs E]

Writes ``benchmarks/results/optimizers.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_nn import optim
from jaxopt_nn.tree import format_table

RESULTS = Path(__file__).parent / "results" / "optimizers.json"


def make_params(scale: float) -> dict[str, jax.Array]:
    side = int(2048 * math.sqrt(scale))
    shapes = {
        "w1": (side, side),
        "w2": (side, side),
        "w3": (side // 2, 3 * side // 4),
        "b": (side,),
    }
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {
        name: jax.random.normal(k, shape, jnp.float32) * 0.02
        for (name, shape), k in zip(shapes.items(), keys, strict=True)
    }


def state_bytes(state) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state))


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def digits_accuracy(epochs: int) -> dict[str, float]:
    """Test accuracy of LeNet-300-100 on digits after ``epochs`` with each Adam state."""
    from flax import nnx

    from jaxopt_nn import data, train
    from jaxopt_nn.models import LeNet300100

    digits = data.load_digits()
    accuracy = {}
    for name, quantization in [
        ("float32", None),
        ("8-bit", optim.BlockQuantization(bits=8)),
        ("4-bit", optim.BlockQuantization(bits=4)),
    ]:
        result = train.fit(
            LeNet300100(64, rngs=nnx.Rngs(0)),
            optim.adam(1e-3, state_quantization=quantization),
            digits,
            epochs=epochs,
            batch_size=64,
            progress=False,
        )
        metrics = train.evaluate(result.graphdef, result.state, digits.x_test, digits.y_test)
        accuracy[name] = float(metrics["accuracy"])
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2.5M parameters, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--epochs", type=int, default=15, help="LeNet-300-100/digits epochs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    repeats = args.repeats or (7 if args.quick else 25)
    load_before = os.getloadavg()

    base = make_params(0.25 if args.quick else 1.0)
    n = sum(x.size for x in jax.tree.leaves(base))
    grads = jax.tree.map(lambda p: jnp.sin(p * 50.0), base)
    f32 = 4 * n  # bytes of one float32 copy of the params
    variants = {
        "adam (ours)": (optim.adam(1e-3), 7 * f32),
        "adam (optax)": (optax.adam(1e-3), 7 * f32),
        "rmsprop (ours)": (optim.rmsprop(1e-3), 5 * f32),
        "rmsprop (optax)": (optax.rmsprop(1e-3), 5 * f32),
        "adam 8-bit (ours)": (optim.adam(1e-3, eight_bit=True), None),
        "adam 4-bit (ours)": (
            optim.adam(1e-3, state_quantization=optim.BlockQuantization(bits=4)),
            None,
        ),
        "rmsprop 8-bit (ours)": (optim.rmsprop(1e-3, eight_bit=True), None),
    }
    carries, steps, traffic, sizes, xla_bytes = {}, {}, {}, {}, {}
    for name, (tx, moved) in variants.items():
        params = jax.tree.map(jnp.copy, base)
        state = jax.jit(tx.init)(params)
        sizes[name] = state_bytes(state)
        # read params + grads + state, write params + state
        traffic[name] = moved if moved is not None else 3 * f32 + 2 * sizes[name]
        steps[name] = make_step(tx)
        cost = steps[name].lower(params, state, grads).compile().cost_analysis()
        xla_bytes[name] = (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
        params, state = steps[name](params, state, grads)  # compile
        jax.block_until_ready(params)
        carries[name] = (params, state)

    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    copy_times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            np.copyto(dst, src)
        copy_times.append((time.perf_counter() - start) / args.steps)
        for name, step in steps.items():
            params, state = carries[name]
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                params, state = step(params, state, grads)
            jax.block_until_ready((params, state))
            times[name].append((time.perf_counter() - start) / args.steps)
            cpu_times[name].append((time.process_time() - cpu) / args.steps)
            carries[name] = (params, state)
    load_after = os.getloadavg()

    copy_bandwidth = 2 * f32 / statistics.median(copy_times)
    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    rows, results = [], {}
    for name in variants:
        baseline = name.replace("(ours)", "(optax)")
        if "-bit" in name:
            baseline = name.split()[0] + " (ours)"
        ratio = statistics.median(a / b for a, b in zip(times[name], times[baseline], strict=True))
        cpu_ratio = cpu_medians[name] / cpu_medians[baseline]
        fraction = traffic[name] / medians[name] / copy_bandwidth
        results[name] = {
            "median_step_ms": 1e3 * medians[name],
            "step_ms": [1e3 * t for t in times[name]],
            "median_cpu_ms": 1e3 * cpu_medians[name],
            "cpu_ms": [1e3 * t for t in cpu_times[name]],
            "ratio_vs": baseline,
            "ratio": ratio,
            "cpu_ratio": cpu_ratio,
            "bytes_per_step": traffic[name],
            "xla_bytes_accessed": xla_bytes[name],
            "fraction_of_copy_bandwidth": fraction,
            "state_bytes": sizes[name],
        }
        rows.append(
            [
                name,
                f"{1e3 * medians[name]:.2f}",
                f"{ratio:.3f}" if baseline != name else "-",
                f"{1e3 * cpu_medians[name]:.2f}",
                f"{cpu_ratio:.3f}" if baseline != name else "-",
                f"{traffic[name] / 2**20:.0f}",
                f"{xla_bytes[name] / 2**20:.0f}",
                f"{fraction:.2f}",
                f"{sizes[name] / 2**20:.1f}",
            ]
        )
    state_ratio = sizes["adam 8-bit (ours)"] / sizes["adam (ours)"]
    state_ratio_4 = sizes["adam 4-bit (ours)"] / sizes["adam (ours)"]
    print(
        f"{n:,} parameters, {repeats} rounds x {args.steps} steps, "
        f"np.copyto bandwidth {copy_bandwidth / 1e9:.2f} GB/s, "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(
        format_table(
            [
                "variant",
                "median ms/step",
                "ratio",
                "CPU ms/step",
                "CPU ratio",
                "MiB moved/step",
                "XLA MiB/step",
                "of copy bw",
                "state MiB",
            ],
            rows,
        )
    )
    print(f"8-bit Adam state / float32 Adam state = {state_ratio:.3f}")
    print(f"4-bit Adam state / float32 Adam state = {state_ratio_4:.3f}")
    accuracy = digits_accuracy(args.epochs)
    print(
        f"LeNet-300-100/digits test accuracy after {args.epochs} epochs: "
        + ", ".join(f"{name} {value:.4f}" for name, value in accuracy.items())
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "parameters": n,
                "quick": args.quick,
                "repeats": repeats,
                "steps_per_round": args.steps,
                "copy_bandwidth_gb_s": copy_bandwidth / 1e9,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "copy_ms": [1e3 * t for t in copy_times],
                "eight_bit_state_ratio": state_ratio,
                "four_bit_state_ratio": state_ratio_4,
                "digits_epochs": args.epochs,
                "digits_accuracy": accuracy,
                "variants": results,
                "jax": jax.__version__,
                "optax": optax.__version__,
                "backend": jax.default_backend(),
                "device": str(jax.devices()[0].device_kind),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
