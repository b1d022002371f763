"""Latency and accuracy of int8 inference (``to_int8``) against float32, interleaved.

Models: a 1024-wide MLP (1024 -> 1024 -> 1024 -> 10, random weights, random
inputs) at batch 1, 32 and 256; LeNet-300-100 at MNIST's 784 inputs (random
weights, latency only) at batch 128; LeNet-300-100, LeNet-5 (``'SAME'``) and
ResNet-20 (batch norms folded into the convolutions) trained on scikit-learn's
digits, at batch 128. Variants of each model:

* ``float32``: the float model (ResNet-20: after :func:`fold_batchnorm`, so the
  baseline has no batch-norm cost either);
* ``int8-dynamic``: ``to_int8(model)``: per-row / per-example activation scales;
* ``int8-static``: ``to_int8(model, calibrate(model, train batches))``;
* ``int8-all``: ``to_int8(model, fallback=False)``: every layer int8, to show
  what the fallback rule avoids.

Latency: every variant is jitted and warmed up, then ``--rounds`` rounds each
time ``--repeats`` back-to-back calls of every variant, in an order that
rotates every round (so a slow phase of the shared machine hits all); the
median seconds per call is reported and ``speedup = float32 / variant``.
Accuracy: test accuracy on digits (for the MLP: the largest relative logit
error against float32). The CPU's flags (AVX-512, VNNI, AMX) are recorded.

Run: ``python benchmarks/integer.py [--quick]``; writes
``benchmarks/results/integer.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_nn import data, models, train
from jaxopt_nn.integer import calibrate, fold_batchnorm, int8_plan, to_int8
from jaxopt_nn.optim import adam

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_tile")


def cpu_info() -> dict:
    """Model name and the int8-relevant flags from /proc/cpuinfo (empty where unreadable)."""
    info = {"machine": platform.machine(), "model": None, "flags": {}}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] is None:
            info["model"] = value.strip()
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
    info["flags"] = {flag: flag in flags for flag in _FLAGS}
    return info


def _forward(model: nnx.Module):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)), state


def interleaved_latency(models_: dict, x: jax.Array, *, rounds: int, repeats: int) -> dict:
    """Median seconds per call of each model, timed in rotating order."""
    calls = {name: _forward(model) for name, model in models_.items()}
    for fn, state in calls.values():
        for _ in range(2):
            jax.block_until_ready(fn(state, x))
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, state = calls[name]
            start = time.perf_counter()
            for _ in range(repeats):
                out = fn(state, x)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(values) for name, values in times.items()}


def _accuracy(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
    fn, state = _forward(model)
    logits = np.concatenate(
        [np.asarray(fn(state, jnp.asarray(x[i : i + 256]))) for i in range(0, len(x), 256)]
    )
    return float(np.mean(logits.argmax(-1) == y))


def _train(model: nnx.Module, dataset: data.Dataset, epochs: int, seed: int) -> nnx.Module:
    result = train.fit(
        model, adam(1e-3), dataset, epochs=epochs, batch_size=64, seed=seed, progress=False
    )
    trained = nnx.merge(result.graphdef, result.state.params, result.state.rest)
    trained.eval()
    return trained


class MLP(nnx.Module):
    """``width -> width -> width -> 10`` with ReLU."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(width, width, rngs=rngs)
        self.fc2 = nnx.Linear(width, width, rngs=rngs)
        self.fc3 = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _variants(model: nnx.Module, calibration_batches: list, example: jax.Array) -> dict:
    ranges = calibrate(model, calibration_batches)
    return {
        "float32": model,
        "int8-dynamic": to_int8(model, example=example),
        "int8-static": to_int8(model, ranges, example=example),
        "int8-all": to_int8(model, fallback=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "integer.json"))
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    repeats = args.repeats or (3 if args.quick else 10)
    epochs = 3 if args.quick else 30
    digits = data.load("digits")
    x_train, x_test, y_test = digits.x_train, digits.x_test, digits.y_test
    cal_batches = [jnp.asarray(x_train[i : i + 256]) for i in range(0, len(x_train), 256)]
    report: dict = {
        "cpu": cpu_info(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "rounds": rounds,
        "repeats": repeats,
        "epochs": epochs,
        "rows": [],
    }
    print(json.dumps(report["cpu"]))

    def record(name: str, batch: int, variants: dict, x: jax.Array, quality: dict) -> None:
        seconds = interleaved_latency(variants, x, rounds=rounds, repeats=repeats)
        plan = int8_plan(variants["float32"], example=x)
        for variant, s in seconds.items():
            row = {
                "model": name,
                "batch": batch,
                "variant": variant,
                "seconds": s,
                "speedup": seconds["float32"] / s,
                **quality[variant],
            }
            report["rows"].append(row)
            extra = ", ".join(f"{k}={v:.4f}" for k, v in quality[variant].items())
            print(
                f"{name:14s} batch {batch:4d} {variant:13s} {s * 1e6:9.0f} us "
                f"{row['speedup']:5.2f}x  {extra}",
                flush=True,
            )
        report.setdefault("plans", {})[f"{name}@{batch}"] = plan

    mlp = MLP(1024, rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    cal = [jax.random.uniform(jax.random.fold_in(key, i), (256, 1024)) for i in range(4)]
    for batch in (1, 32, 256):
        x = jax.random.uniform(jax.random.fold_in(key, 100 + batch), (batch, 1024))
        variants = _variants(mlp, cal, x)
        ref = np.asarray(variants["float32"](x))
        quality = {
            name: {
                "max_rel_error": float(np.abs(np.asarray(model(x)) - ref).max() / np.abs(ref).max())
            }
            for name, model in variants.items()
        }
        record("mlp-1024", batch, variants, x, quality)

    # LeNet-300-100 at the MNIST input size (784 features), random weights: latency only.
    mnist = models.LeNet300100(784, rngs=nnx.Rngs(0))
    x = jax.random.uniform(key, (128, 784))
    variants = _variants(mnist, [x], x)
    ref = np.asarray(mnist(x))
    quality = {
        name: {"max_rel_error": float(np.abs(np.asarray(m(x)) - ref).max() / np.abs(ref).max())}
        for name, m in variants.items()
    }
    record("lenet-300-100-784", 128, variants, x, quality)

    builders = {
        "lenet-300-100": lambda: models.LeNet300100(64, rngs=nnx.Rngs(0)),
        "lenet-5": lambda: models.LeNet5((8, 8, 1), padding="SAME", rngs=nnx.Rngs(0)),
        "resnet-20": lambda: models.ResNet(20, in_channels=1, rngs=nnx.Rngs(0)),
    }
    for name, build in builders.items():
        model = _train(build(), digits, epochs, seed=0)
        if name == "resnet-20":
            model = fold_batchnorm(model)
        x = jnp.asarray(x_test[:128])
        variants = _variants(model, cal_batches, x)
        quality = {
            variant: {"accuracy": _accuracy(m, x_test, y_test)} for variant, m in variants.items()
        }
        record(name, 128, variants, x, quality)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
