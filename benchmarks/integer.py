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
* ``int8-dynamic-measured`` / ``int8-static-measured``: the same with
  ``fallback='measure'``: each layer timed on the batch at conversion and
  built as the fastest of float32, float32 im2col (convolutions) and int8,
  each kept only where it measured at least 1.05x faster than the one before;
  stems with few input channels never int8 (each row's ``layers`` says which
  each layer became);
* ``int8-all``: ``to_int8(model, fallback=False)``: every layer int8, to show
  what the fallback avoids;
* ``float32-im2col`` (models with convolutions): every ``nnx.Conv`` an
  :class:`~jaxopt_nn.integer.Im2colConv` (im2col patches and one matrix
  product, as the int8 layers compute it, in float32): the baseline that
  separates the gain of the algorithm from the gain of int8
  (``speedup_vs_im2col``).

Before the models, ``bare`` records the ``int8 x int8 -> int32`` product
alone against the float32 product of the same shapes (and the whole
``Int8Linear`` against ``nnx.Linear``): the ceiling of what int8 can gain on
this CPU.

Latency: every variant is jitted and warmed up, then ``--rounds`` rounds each
time a batch of back-to-back calls of every variant (about 0.1 s of float32
work), in an order that rotates every round (so a slow phase of the shared
machine hits all); reported are the median seconds per call and, as
``speedup``, the median over the rounds of ``float32 / variant`` (the two
times of one round, so a burst of load that slows a round cancels). The load
average is recorded before and after each model. Accuracy: test accuracy on
digits (for the MLP: the largest relative logit error against float32). The
CPU's flags (AVX-512, VNNI, AMX) are recorded.

Run: ``python benchmarks/integer.py [--quick] [--out FILE]``; writes
``benchmarks/results/integer.json`` (the README quotes one file per jax
version: ``integer.json`` for jax 0.12, ``integer_jax010.json`` for 0.10).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxopt_nn import data, models, train
from jaxopt_nn.integer import (
    Im2colConv,
    Int8Conv,
    Int8Linear,
    _get,
    _modules,
    _set,
    calibrate,
    fold_batchnorm,
    int8_plan,
    to_int8,
)
from jaxopt_nn.optim import adam
from jaxopt_nn.speed import compare_latency

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


def interleaved_latency(models_: dict, x: jax.Array, *, rounds: int, budget: float) -> dict:
    """Seconds per call of each model in each round, timed in rotating order.

    Each timed batch has as many calls as take about ``budget`` seconds of float32.
    """
    calls = {name: _forward(model) for name, model in models_.items()}
    for fn, state in calls.values():
        for _ in range(2):
            jax.block_until_ready(fn(state, x))
    fn, state = calls["float32"]
    start = time.perf_counter()
    jax.block_until_ready(fn(state, x))
    repeats = max(1, round(budget / (time.perf_counter() - start)))
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
    return times


def _paired(baseline: list, candidate: list) -> float:
    """Median over rounds of ``baseline / candidate`` (both timed in the same round)."""
    return statistics.median(b / c for b, c in zip(baseline, candidate, strict=True))


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


def im2col_model(model: nnx.Module) -> nnx.Module | None:
    """A copy of ``model`` with every ``nnx.Conv`` an :class:`Im2colConv` (None: no conv)."""
    out = nnx.clone(model)
    convs = [(name, path) for name, path, m in _modules(out) if isinstance(m, nnx.Conv)]
    for name, path in convs:
        _set(out, path, Im2colConv.from_conv(_get(out, path), name=name))
    return out if convs else None


def _float_dot(x: jax.Array, w: jax.Array, xq: jax.Array, wq: jax.Array) -> jax.Array:
    del xq, wq
    return x @ w


def _int8_dot(x: jax.Array, w: jax.Array, xq: jax.Array, wq: jax.Array) -> jax.Array:
    del x, w
    return lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def bare_products(shapes: list, *, rounds: int) -> list:
    """The ``(M, K) x (K, N)`` product alone and the whole dense layer, int8 against float32.

    ``dot``: ``int8 x int8 -> int32`` ``dot_general`` against the float32
    ``dot`` of the same shapes (no quantization, no rescale: the ceiling of
    what int8 can gain on this CPU). ``layer-dynamic`` / ``layer-static``:
    :class:`Int8Linear` (input quantized per row / with one static range,
    product, rescale, bias) against ``nnx.Linear``. Each pair is timed with
    :func:`jaxopt_nn.speed.compare_latency` (paired rounds of about 0.05 s,
    order alternating, median of the ratios).
    """
    rows = []
    key = jax.random.key(7)
    for m, k, n in shapes:
        x = jax.random.normal(jax.random.fold_in(key, m * k), (m, k))
        w = jax.random.normal(jax.random.fold_in(key, k * n), (k, n))
        xq, wq = (jnp.clip(jnp.round(a * 40), -127, 127).astype(jnp.int8) for a in (x, w))
        dense = nnx.Linear(k, n, rngs=nnx.Rngs(0))
        pairs = {
            "dot": (
                _float_dot,
                _int8_dot,
                (x, w, xq, wq),
            ),
            "layer-dynamic": (dense, Int8Linear.from_linear(dense), (x,)),
            "layer-static": (
                dense,
                Int8Linear.from_linear(dense, input_range=jnp.abs(x).max()),
                (x,),
            ),
        }
        for what, (baseline, candidate, args) in pairs.items():
            load = os.getloadavg()
            result = compare_latency(
                baseline, candidate, *args, repeats=None, rounds=rounds, round_seconds=0.05
            )
            row = {
                "shape": [m, k, n],
                "what": what,
                "float32_s": result.baseline,
                "int8_s": result.candidate,
                "speedup": result.speedup,
                "loadavg_before": load,
            }
            rows.append(row)
            print(
                f"bare {what:13s} {m}x{k}x{n}: float32 {result.baseline * 1e6:8.0f} us, "
                f"int8 {result.candidate * 1e6:8.0f} us, {result.speedup:.2f}x "
                f"(load {load[0]:.1f})",
                flush=True,
            )
    return rows


def _variants(model: nnx.Module, calibration_batches: list, example: jax.Array) -> dict:
    ranges = calibrate(model, calibration_batches)
    variants = {
        "float32": model,
        "float32-im2col": im2col_model(model),
        "int8-dynamic": to_int8(model, example=example),
        "int8-static": to_int8(model, ranges, example=example),
        "int8-dynamic-measured": to_int8(model, fallback="measure", example=example),
        "int8-static-measured": to_int8(model, ranges, fallback="measure", example=example),
        "int8-all": to_int8(model, fallback=False),
    }
    return {name: m for name, m in variants.items() if m is not None}


def _layers(model: nnx.Module) -> dict:
    """``{layer name: 'int8', 'float32-im2col' or 'float32'}``: what a converted model runs."""
    kinds = {Int8Linear: "int8", Int8Conv: "int8", Im2colConv: "float32-im2col"}
    return {
        name: kinds.get(type(m), "float32")
        for name, _, m in _modules(model)
        if isinstance(m, (nnx.Linear, nnx.Conv, *kinds))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs and rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of float32 work per timed batch"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "integer.json"))
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 15)
    budget = args.budget or (0.02 if args.quick else 0.1)
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
        "budget_s": budget,
        "loadavg_start": os.getloadavg(),
        "epochs": epochs,
        "rows": [],
    }
    print(json.dumps(report["cpu"]))

    def record(name: str, batch: int, variants: dict, x: jax.Array, quality: dict) -> None:
        load_before = os.getloadavg()
        times = interleaved_latency(variants, x, rounds=rounds, budget=budget)
        load_after = os.getloadavg()
        plan = int8_plan(variants["float32"], example=x)
        for variant, per_round in times.items():
            s = statistics.median(per_round)
            row = {
                "model": name,
                "batch": batch,
                "variant": variant,
                "seconds": s,
                "speedup": _paired(times["float32"], per_round),
                **quality[variant],
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            }
            if "float32-im2col" in times:
                row["speedup_vs_im2col"] = _paired(times["float32-im2col"], per_round)
            if variant.startswith("int8"):
                row["layers"] = _layers(variants[variant])
            report["rows"].append(row)
            extra = ", ".join(f"{k}={v:.4f}" for k, v in quality[variant].items())
            print(
                f"{name:14s} batch {batch:4d} {variant:13s} {s * 1e6:9.0f} us "
                f"{row['speedup']:5.2f}x  {extra}",
                flush=True,
            )
        report.setdefault("plans", {})[f"{name}@{batch}"] = plan

    report["bare"] = bare_products(
        [(256, 1024, 1024), (32, 1024, 1024), (128, 784, 300), (128, 64, 300)], rounds=rounds
    )

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

    report["loadavg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
