"""Step time of jaxopt_nn's Adam/RMSprop vs optax's, memory traffic, 8-bit and 4-bit state.

Each variant is a jitted, donated ``update + apply_updates`` step on a pytree of
a few large float32 leaves (~10M parameters; ``--quick``: ~2.5M). The
quantized variants run twice: through the fused CPU kernel
(``BlockQuantization(kernel='cpu')``, what ``'auto'`` picks on a one-device
CPU) and through the XLA path (``kernel='xla'``). Every variant is timed in
two settings:

* ``in-step gradient`` (as in training): the gradient is made inside the
  step (``grads * scale`` in a ``lax.cond`` branch, which XLA writes to
  memory as a backward pass would, for every variant alike; XLA in jax 0.10
  drops an optimization barrier and fuses the product into float32 Adam's
  loop) and dies there, so the kernel writes the update over it;
* ``given gradient``: the gradient is an argument of the step that is not
  donated, so XLA copies it for the kernel (which overwrites it) each step.

Variants run interleaved, round-robin, with an ``np.copyto`` of a buffer of
the same total size measured in the same loop, so machine load hits all of
them alike. The memory traffic of a step is the minimum it must read and
write (params, grads, moments, scales; in-step: also the gradient's input
and the gradient), reported as a fraction of the copy bandwidth (bytes read
+ written per second); XLA's own count (``cost_analysis``, which does not
see inside the kernel) is reported next to it. Quantized variants are
compared with float32 Adam (RMSprop with float32 RMSprop) of the same
setting: the ratio is the median over rounds of the two times measured in
the same round. Each step's process CPU time (all threads) is recorded too:
on a machine shared with other jobs it moves less with the load than the
wall time. The load average is recorded before and after.

``--accuracy`` instead trains LeNet-300-100 and ResNet-20 on digits with
float32, 8-bit and 4-bit Adam (same seed, epochs and batches) and reports
their test accuracies.

    python benchmarks/optimizers.py [--quick] [--repeats N]
    python benchmarks/optimizers.py --accuracy [--epochs E]

Writes ``benchmarks/results/optimizers.json`` (``--accuracy``:
``optimizers_accuracy.json``; ``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_nn import optim
from jaxopt_nn._blockwise import uses_kernel
from jaxopt_nn.tree import format_table

RESULTS = Path(__file__).parent / "results" / "optimizers.json"
ACCURACY_RESULTS = RESULTS.with_name("optimizers_accuracy.json")


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


SETTINGS = {
    "in-step gradient": "in_step",
    "given gradient": "given",
}


def make_step(tx: optax.GradientTransformation, setting: str):
    """The jitted, donated step of ``tx`` for ``setting`` ('in_step' or 'given')."""
    if setting == "given":

        def step(params, state, grads, scale):
            del scale
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

    else:

        def step(params, state, grads, scale):
            # Written to memory and dead after the update, like the output of
            # a backward pass: XLA does not fuse across a conditional (it
            # would fuse a plain product into float32 Adam's loop).
            grads = jax.lax.cond(
                scale > 0, lambda g: jax.tree.map(lambda x: x * scale, g), lambda g: g, grads
            )
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def digits_accuracy(epochs: int) -> dict[str, dict[str, float]]:
    """Test accuracy on digits after ``epochs`` with each Adam state, per model."""
    from flax import nnx

    from jaxopt_nn import data, train
    from jaxopt_nn.models import LeNet300100, ResNet

    digits = data.load_digits()
    models = {
        "LeNet-300-100": lambda: LeNet300100(64, rngs=nnx.Rngs(0)),
        "ResNet-20": lambda: ResNet(20, 10, in_channels=1, rngs=nnx.Rngs(0)),
    }
    accuracy: dict[str, dict[str, float]] = {}
    for model_name, make_model in models.items():
        accuracy[model_name] = {}
        for name, quantization in [
            ("float32", None),
            ("8-bit", optim.BlockQuantization(bits=8)),
            ("4-bit", optim.BlockQuantization(bits=4)),
        ]:
            result = train.fit(
                make_model(),
                optim.adam(1e-3, state_quantization=quantization),
                digits,
                epochs=epochs,
                batch_size=64,
                progress=False,
            )
            metrics = train.evaluate(result.graphdef, result.state, digits.x_test, digits.y_test)
            accuracy[model_name][name] = float(metrics["accuracy"])
            print(f"{model_name} {name}: test accuracy {accuracy[model_name][name]:.4f}")
    return accuracy


def accuracy_main(epochs: int, out: Path) -> None:
    load_before = os.getloadavg()
    accuracy = digits_accuracy(epochs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/optimizers.py " + " ".join(sys.argv[1:]),
                "epochs": epochs,
                "batch_size": 64,
                "learning_rate": 1e-3,
                "seed": 0,
                "accuracy": accuracy,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "jax": jax.__version__,
                "python": platform.python_version(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


def _variants(f32: int) -> dict[str, tuple[optax.GradientTransformation, int | None, str]]:
    """name -> (transform, bytes moved per step or None (from the state), baseline name)."""
    q = optim.BlockQuantization
    variants: dict[str, tuple[optax.GradientTransformation, int | None, str]] = {
        "adam (ours)": (optim.adam(1e-3), 7 * f32, "adam (optax)"),
        "adam (optax)": (optax.adam(1e-3), 7 * f32, "adam (optax)"),
        "rmsprop (ours)": (optim.rmsprop(1e-3), 5 * f32, "rmsprop (optax)"),
        "rmsprop (optax)": (optax.rmsprop(1e-3), 5 * f32, "rmsprop (optax)"),
    }
    for kernel in ("kernel", "xla"):
        path = "cpu" if kernel == "kernel" else "xla"
        for bits in (8, 4):
            quant = q(bits=bits, kernel=path)
            variants[f"adam {bits}-bit ({kernel})"] = (
                optim.adam(1e-3, state_quantization=quant),
                None,
                "adam (ours)",
            )
        variants[f"rmsprop 8-bit ({kernel})"] = (
            optim.rmsprop(1e-3, state_quantization=q(bits=8, kernel=path)),
            None,
            "rmsprop (ours)",
        )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~2.5M parameters, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument(
        "--accuracy", action="store_true", help="train LeNet-300-100, ResNet-20 on digits instead"
    )
    parser.add_argument("--epochs", type=int, default=15, help="epochs of --accuracy")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    if args.accuracy:
        accuracy_main(args.epochs, args.out or ACCURACY_RESULTS)
        return
    args.out = args.out or RESULTS
    repeats = args.repeats or (7 if args.quick else 25)
    load_before = os.getloadavg()

    base = make_params(0.25 if args.quick else 1.0)
    n = sum(x.size for x in jax.tree.leaves(base))
    grads = jax.tree.map(lambda p: jnp.sin(p * 50.0), base)
    scale = jnp.float32(1.0)
    f32 = 4 * n  # bytes of one float32 copy of the params
    variants = _variants(f32)
    auto = uses_kernel(optim.BlockQuantization(), grads["w1"])
    steps, carries, traffic, sizes, xla_bytes = {}, {}, {}, {}, {}
    for name, (tx, moved, _) in variants.items():
        params = jax.tree.map(jnp.copy, base)
        state = jax.jit(tx.init)(params)
        sizes[name] = state_bytes(state)
        # read params + grads + state, write params + state
        minimum = moved if moved is not None else 3 * f32 + 2 * sizes[name]
        for label, setting in SETTINGS.items():
            key = (label, name)
            # in-step: also read the gradient's input and write the gradient
            traffic[key] = minimum + (2 * f32 if setting == "in_step" else 0)
            steps[key] = make_step(tx, setting)
            cost = steps[key].lower(params, state, grads, scale).compile().cost_analysis()
            xla_bytes[key] = (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
            carried = (jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state))
            carried = steps[key](*carried, grads, scale)  # compile
            jax.block_until_ready(carried)
            carries[key] = carried

    src = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    cpu_times: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    copy_times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            np.copyto(dst, src)
        copy_times.append((time.perf_counter() - start) / args.steps)
        for key, step in steps.items():
            params, state = carries[key]
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                params, state = step(params, state, grads, scale)
            jax.block_until_ready((params, state))
            times[key].append((time.perf_counter() - start) / args.steps)
            cpu_times[key].append((time.process_time() - cpu) / args.steps)
            carries[key] = (params, state)
    load_after = os.getloadavg()

    copy_bandwidth = 2 * f32 / statistics.median(copy_times)
    state_ratio = sizes["adam 8-bit (kernel)"] / sizes["adam (ours)"]
    state_ratio_4 = sizes["adam 4-bit (kernel)"] / sizes["adam (ours)"]
    print(
        f"{n:,} parameters, {repeats} rounds x {args.steps} steps, "
        f"np.copyto bandwidth {copy_bandwidth / 1e9:.2f} GB/s, "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
        f"jax {jax.__version__}, kernel='auto' picks the kernel here: {auto}"
    )
    results: dict[str, dict[str, dict]] = {}
    for label, setting in SETTINGS.items():
        rows, results[setting] = [], {}
        for name, (_, _, baseline) in variants.items():
            key, base_key = (label, name), (label, baseline)
            median = statistics.median(times[key])
            cpu_median = statistics.median(cpu_times[key])
            ratio = statistics.median(
                a / b for a, b in zip(times[key], times[base_key], strict=True)
            )
            cpu_ratio = cpu_median / statistics.median(cpu_times[base_key])
            fraction = traffic[key] / median / copy_bandwidth
            results[setting][name] = {
                "median_step_ms": 1e3 * median,
                "step_ms": [1e3 * t for t in times[key]],
                "median_cpu_ms": 1e3 * cpu_median,
                "cpu_ms": [1e3 * t for t in cpu_times[key]],
                "ratio_vs": baseline,
                "ratio": ratio,
                "cpu_ratio": cpu_ratio,
                "bytes_per_step": traffic[key],
                "xla_bytes_accessed": xla_bytes[key],
                "fraction_of_copy_bandwidth": fraction,
                "state_bytes": sizes[name],
            }
            rows.append(
                [
                    name,
                    f"{1e3 * median:.2f}",
                    f"{ratio:.3f}" if baseline != name else "-",
                    f"{1e3 * cpu_median:.2f}",
                    f"{cpu_ratio:.3f}" if baseline != name else "-",
                    f"{traffic[key] / 2**20:.0f}",
                    f"{xla_bytes[key] / 2**20:.0f}",
                    f"{fraction:.2f}",
                    f"{sizes[name] / 2**20:.1f}",
                ]
            )
        print(f"\n{label}:")
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/optimizers.py " + " ".join(sys.argv[1:]),
                "parameters": n,
                "quick": args.quick,
                "repeats": repeats,
                "steps_per_round": args.steps,
                "copy_bandwidth_gb_s": copy_bandwidth / 1e9,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "copy_ms": [1e3 * t for t in copy_times],
                "auto_uses_kernel": auto,
                "eight_bit_state_ratio": state_ratio,
                "four_bit_state_ratio": state_ratio_4,
                "settings": results,
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
