"""Accuracy and size of LeNet-300-100 on digits vs bits, for five quantization methods.

For bits 2..8 and every seed, starting from the same float32 model of that seed:

* ``ptq-tensor``: post-training uniform quantization, one scale per tensor;
* ``ptq-channel``: post-training uniform quantization, one scale per output channel;
* ``qat``: quantization-aware fine-tuning (fake quant + STE, per tensor; adam 1e-3), then quantized;
* ``kmeans``: k-means weight sharing (linear init), no retraining;
* ``kmeans-ft``: k-means weight sharing + centroid fine-tuning (adam 1e-3, same epochs as qat).

Kernels are quantized, biases stay float32. Bytes per model count the packed
codes (``pack_bits`` sizes), the per-tensor/per-channel scale (float32) and
zero point (one code), or the float32 codebook, plus the float32 biases. Test
accuracy is the median over seeds; the float32 model of the same run is the
baseline, and so is that model trained for the same extra epochs as ``qat``
and ``kmeans-ft`` (``float32-ft``), so that retraining gains are not credited
to quantization.

Run: ``python benchmarks/quantization.py [--quick]``; writes
``benchmarks/results/quantization.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jaxopt_nn import data, models, train, tree
from jaxopt_nn.quantization import (
    centroid_params,
    dequantize_tree,
    fake_quant_tree,
    kmeans_tree,
    packed_size,
    quantize_tree,
    share_weights,
)

METHODS = ("ptq-tensor", "ptq-channel", "qat", "kmeans", "kmeans-ft")


def _float_bytes(params) -> int:
    return sum(int(np.size(leaf)) * 4 for leaf in jax.tree.leaves(params))


def _uniform_bytes(params, bits: int, per_channel: bool) -> int:
    total = 0
    for (_, leaf), selected in zip(
        tree.leaves_with_names(params), jax.tree.leaves(tree.select(params)), strict=True
    ):
        if not selected:
            total += int(np.size(leaf)) * 4
            continue
        channels = leaf.shape[-1] if per_channel else 1
        total += packed_size(int(np.size(leaf)), bits) + channels * (4 + math.ceil(bits / 8))
    return total


def _kmeans_bytes(params, books) -> int:
    total = 0
    for name, leaf in tree.leaves_with_names(params):
        if name in books:
            k = books[name].centroids.size
            total += packed_size(int(np.size(leaf)), int(math.log2(k))) + 4 * k
        else:
            total += int(np.size(leaf)) * 4
    return total


def _accuracy(graphdef, state, ds, transform=None) -> float:
    metrics = train.evaluate(graphdef, state, ds.x_test, ds.y_test, param_transform=transform)
    return metrics["accuracy"]


def _finetune_centroids(graphdef, state, books, ds, *, epochs: int, lr: float, seed: int):
    tx = optax.adam(lr)
    trainable, rebuild = centroid_params(state.params, books)
    tuned = train.TrainState(trainable, state.rest, tx.init(trainable))
    step = train.make_train_step(graphdef, tx, param_transform=rebuild, donate=False)
    for epoch in range(epochs):
        for xb, yb in data.batches(
            ds.x_train, ds.y_train, 128, seed=(seed, epoch), drop_remainder=True
        ):
            tuned, _ = step(tuned, xb, yb)
    return tuned, rebuild


def run_seed(ds, seed: int, bits_list, *, epochs: int, ft_epochs: int) -> dict:
    model = models.LeNet300100(64, rngs=nnx.Rngs(seed))
    base = train.fit(model, optax.adam(1e-3), ds, epochs=epochs, seed=seed, progress=False)
    graphdef, state = base.graphdef, base.state
    params = state.params
    out = {"float32": {"accuracy": _accuracy(graphdef, state, ds), "bytes": _float_bytes(params)}}
    longer = train.fit(
        train.to_model(graphdef, state),
        optax.adam(1e-3),
        ds,
        epochs=ft_epochs,
        seed=seed,
        progress=False,
    )
    out["float32-ft"] = {
        "accuracy": _accuracy(longer.graphdef, longer.state, ds),
        "bytes": _float_bytes(params),
    }
    for bits in bits_list:
        rows = {}
        for method, axis in (("ptq-tensor", None), ("ptq-channel", -1)):
            stored = functools.partial(
                lambda p, b, a: dequantize_tree(quantize_tree(p, b, axis=a)), b=bits, a=axis
            )
            rows[method] = {
                "accuracy": _accuracy(graphdef, state, ds, stored),
                "bytes": _uniform_bytes(params, bits, axis is not None),
            }
        qat = train.fit(
            train.to_model(graphdef, state),
            optax.adam(1e-3),
            ds,
            epochs=ft_epochs,
            seed=seed,
            progress=False,
            param_transform=functools.partial(fake_quant_tree, bits=bits),
        )
        stored = functools.partial(lambda p, b: dequantize_tree(quantize_tree(p, b)), b=bits)
        rows["qat"] = {
            "accuracy": _accuracy(qat.graphdef, qat.state, ds, stored),
            "bytes": _uniform_bytes(params, bits, False),
        }
        books = kmeans_tree(params, bits)
        size = _kmeans_bytes(params, books)
        shared = functools.partial(share_weights, codebooks=books)
        rows["kmeans"] = {"accuracy": _accuracy(graphdef, state, ds, shared), "bytes": size}
        tuned, rebuild = _finetune_centroids(
            graphdef, state, books, ds, epochs=ft_epochs, lr=1e-3, seed=seed
        )
        rows["kmeans-ft"] = {"accuracy": _accuracy(graphdef, tuned, ds, rebuild), "bytes": size}
        out[str(bits)] = rows
    return out


def summarise(runs: list[dict], bits_list) -> dict:
    float_acc = float(np.median([r["float32"]["accuracy"] for r in runs]))
    float_bytes = runs[0]["float32"]["bytes"]
    table = {"float32": {"accuracy": float_acc, "bytes": float_bytes, "compression": 1.0}}
    longer = [r["float32-ft"]["accuracy"] for r in runs]
    table["float32-ft"] = {
        "accuracy": float(np.median(longer)),
        "bytes": float_bytes,
        "compression": 1.0,
    }
    for bits in bits_list:
        for method in METHODS:
            accs = [r[str(bits)][method]["accuracy"] for r in runs]
            size = runs[0][str(bits)][method]["bytes"]
            table[f"{method}@{bits}"] = {
                "bits": bits,
                "method": method,
                "accuracy": float(np.median(accs)),
                "accuracy_min": float(np.min(accs)),
                "delta_vs_float": float(np.median(accs)) - float_acc,
                "bytes": size,
                "compression": float_bytes / size,
            }
    return table


def format_report(table: dict, bits_list) -> str:
    headers = ["bits", "bytes (tensor / channel / k-means)"] + [f"{m} acc %" for m in METHODS]
    rows = [
        [label, f"{table[key]['bytes']:,}"] + [f"{100 * table[key]['accuracy']:.2f}"] * len(METHODS)
        for label, key in (("32 (float)", "float32"), ("32 (float, +ft epochs)", "float32-ft"))
    ]
    for bits in bits_list:
        entry = {m: table[f"{m}@{bits}"] for m in METHODS}
        sizes = " / ".join(
            f"{entry[m]['bytes']:,}" for m in ("ptq-tensor", "ptq-channel", "kmeans")
        )
        rows.append([str(bits), sizes] + [f"{100 * entry[m]['accuracy']:.2f}" for m in METHODS])
    return tree.format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, bits 2, 4, 8, short training"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "quantization.json"
    )
    args = parser.parse_args()
    bits_list = [2, 4, 8] if args.quick else list(range(2, 9))
    seeds = 1 if args.quick else args.seeds
    epochs, ft_epochs = (10, 2) if args.quick else (20, 5)
    ds = data.load_digits()
    start = time.perf_counter()
    runs = [
        run_seed(ds, seed, bits_list, epochs=epochs, ft_epochs=ft_epochs) for seed in range(seeds)
    ]
    table = summarise(runs, bits_list)
    report = format_report(table, bits_list)
    print(report)
    result = {
        "benchmark": "quantization",
        "model": "LeNet-300-100 (64-300-100-10)",
        "data": "digits (test set of 450)",
        "seeds": seeds,
        "train_epochs": epochs,
        "finetune_epochs": ft_epochs,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "seconds": time.perf_counter() - start,
        "results": table,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
