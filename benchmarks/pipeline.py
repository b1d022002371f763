"""Deep Compression on digits: the compression/accuracy frontier, with and without a budget.

For each model (LeNet-300-100, LeNet-5), seed and mode, the same NNX model is
compressed by :func:`jaxopt_nn.pipeline.deep_compress`:

* ``default``: the hand-set per-layer sparsity and bits;
* ``max_drop=0.5`` and ``max_drop=0.0``: the accuracy-budget search (per-layer
  sparsity and bits chosen on a validation split carved from the training
  data; the test split is only reported);
* ``soft``: soft weight-sharing (:mod:`jaxopt_nn.soft_sharing`, a learned
  17-component Gaussian-mixture prior per kernel during retraining, its
  weight ramped up over the first 10 epochs) instead of pruning and k-means,
  each weight then set to its most responsible component's mean and the
  means fine-tuned (as the ``shared`` stage), then the same archive.

For the default mode the final weights are also stored the way a hand-rolled
script would (``np.savez_compressed`` of float32 arrays, lzma of their raw
bytes), measured in the same run. Reported per run: compression (float32
bytes of all stored leaves / archive bytes), dense and archive test accuracy,
wall time; medians over seeds. The published numbers quoted beside ours are
on MNIST (28x28, 60k training images), not on digits (8x8, 1,347): they frame
the scale, they are not a like-for-like comparison.

Usage: ``python benchmarks/pipeline.py [--seeds 0 1 2] [--models lenet300 lenet5]
[--modes default 0.5 0.0] [--quick] [--prune-epochs N] [--validation F] [--folds K] [--distill W]
[--plot frontier.png]``.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import platform
import statistics
import time

import jax
import numpy as np
import optax
from flax import nnx

from jaxopt_nn import archive, pipeline, quantization, train
from jaxopt_nn import tree as tree_lib
from jaxopt_nn.cli import MODELS
from jaxopt_nn.data import load_digits
from jaxopt_nn.optim import adam
from jaxopt_nn.soft_sharing import mixture_codebooks, soft_weight_sharing

SOFT_COMPONENTS = 17  # as Ullrich et al.: 16 shared values and the zero component
SOFT_TAU = 5e-3  # per training example, as Ullrich et al. (complexity term over the data set size)
SOFT_WARMUP_EPOCHS = 10

# Published compression on MNIST (test error before -> after), for scale only.
PUBLISHED = {
    "lenet300": [
        ("Deep Compression (Han et al. 2016)", 40, "1.64% -> 1.58%"),
        ("Soft Weight-Sharing (Ullrich et al. 2017)", 64, "1.89% -> 1.94%"),
        ("Entropy-Penalized Reparam. (Oktay et al. 2020)", 124, "1.6% -> 1.9%"),
    ],
    "lenet5": [
        ("Deep Compression (Han et al. 2016)", 39, "0.80% -> 0.74%"),
        ("Soft Weight-Sharing (Ullrich et al. 2017)", 162, "0.88% -> 0.97%"),
        ("Bayesian Compression (Louizos et al. 2017)", 419, "not quoted"),
        ("Entropy-Penalized Reparam. (Oktay et al. 2020)", 606, "0.7% -> 1.0%"),
    ],
}


def baselines(path: str) -> dict[str, int]:
    """Bytes of the same weights under generic compressors."""
    stored = archive.load(path)
    leaves = {
        "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v, np.float32)
        for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **leaves)
    raw = b"".join(v.tobytes() for v in leaves.values())
    return {
        "savez_compressed": len(buffer.getvalue()),
        "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    }


def run_one(name: str, mode: str, seed: int, data, short: dict, out_dir: str) -> dict:
    path = os.path.join(out_dir, f"{name}-digits-{mode}-seed{seed}.jnz")
    model = MODELS[name](data.in_shape, data.num_classes, nnx.Rngs(seed))
    max_drop = None if mode == "default" else float(mode)
    start, cpu = time.perf_counter(), time.process_time()
    report = pipeline.deep_compress(
        model, data, seed=seed, path=path, progress=False, max_drop=max_drop, **short
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    other = baselines(path) if mode == "default" else {}
    os.remove(path)
    print(report.table())
    if report.search is not None:
        print(report.search_summary())
    print(f"{name} {mode} seed {seed}: {report.summary()} ({seconds:.1f} s)")
    return {
        "model": name,
        "mode": mode,
        "seed": seed,
        "prune_epochs": short.get("prune_epochs", 60),  # deep_compress's default
        "validation_examples": (report.search or {}).get("validation_examples"),
        "folds": (report.search or {}).get("folds"),
        "distill": (report.search or {}).get("distill"),  # None: no budget, no distillation
        "seconds": seconds,
        "cpu_seconds": cpu,  # this process's CPU time, all threads: wall on a quiet machine
        "loadavg": os.getloadavg(),  # the machine is shared: wall times depend on its load
        "dense_accuracy": report.stage("dense").accuracy,
        "archive_accuracy": report.stage("archive").accuracy,
        "original_bytes": report.original_bytes,
        "archive_bytes": report.info.file_bytes,
        "compression": report.compression,
        "baseline_bytes": other,
        "baseline_compression": {k: report.original_bytes / v for k, v in other.items()},
        "report": report.to_dict(),
    }


def run_soft(name: str, seed: int, data, short: dict) -> dict:
    """Soft weight-sharing instead of pruning + k-means: dense, retrain under one mixture prior
    per kernel (one shared mixture cannot resolve layers of different weight scales: the
    smallest layer falls inside the zero component), hard assignment, fine-tuned means."""
    model = MODELS[name](data.in_shape, data.num_classes, nnx.Rngs(seed))
    fit = {"batch_size": 64, "seed": seed, "progress": False}
    start = time.perf_counter()
    original = 4 * tree_lib.count_params(
        pipeline._archive_tree(*nnx.split(model, nnx.Param, ...)[1:])
    )
    dense = train.fit(model, adam(1e-3), data, epochs=short.get("epochs", 30), **fit)
    tau = SOFT_TAU / len(data.x_train)  # the data term is a mean over examples
    warmup = SOFT_WARMUP_EPOCHS * (len(data.x_train) // fit["batch_size"])
    names = tree_lib.selected_names(dense.state.params, None)
    only = [lambda n, _, name=name: n == name for name in names]
    priors = [
        soft_weight_sharing(SOFT_COMPONENTS, tau=tau, warmup_steps=warmup, where=where)
        for where in only
    ]
    soft = train.fit(
        train.to_model(dense.graphdef, dense.state),
        optax.chain(*priors, adam(5e-4)),
        data,
        epochs=short.get("prune_epochs", 60),
        **fit,
    )
    books = {}
    for i, where in enumerate(only):
        books.update(mixture_codebooks(soft.state.params, soft.state.opt_state[i], where=where))
    assigned = train.evaluate(
        dense.graphdef,
        soft.state._replace(params=quantization.share_weights(soft.state.params, books)),
        data.x_test,
        data.y_test,
    )["accuracy"]
    trainable, rebuild = quantization.centroid_params(
        quantization.share_weights(soft.state.params, books), books
    )
    tx = adam(1e-3)
    tuned = train.fit_state(
        dense.graphdef,
        train.TrainState(trainable, soft.state.rest, tx.init(trainable)),
        tx,
        data,
        epochs=short.get("finetune_epochs", 15),
        param_transform=rebuild,
        **fit,
    )
    books = quantization.update_codebooks(books, tuned.state.params)
    params = rebuild(tuned.state.params)
    blob = archive.dumps(
        pipeline._archive_tree(params, soft.state.rest),
        codebooks={f"params/{n}": b for n, b in books.items()},
        raw_dtype="float16",
        centroid_dtype="float16",
    )
    like = train.TrainState(params, soft.state.rest, None)
    restored = pipeline.restore_state(like, archive.loads(blob))
    accuracy = train.evaluate(dense.graphdef, restored, data.x_test, data.y_test)["accuracy"]
    seconds = time.perf_counter() - start
    info = archive.inspect(blob)
    print(info.table())
    print(f"{name} soft seed {seed}: {original / len(blob):.1f}x, {accuracy:.2%} ({seconds:.1f} s)")
    return {
        "model": name,
        "mode": "soft",
        "seed": seed,
        "seconds": seconds,
        "loadavg": os.getloadavg(),
        "dense_accuracy": dense.history[-1]["test_accuracy"],
        "soft_accuracy": soft.history[-1]["test_accuracy"],  # before the hard assignment
        "assigned_accuracy": assigned,  # after it, before fine-tuning the means
        "archive_accuracy": accuracy,
        "original_bytes": original,
        "archive_bytes": len(blob),
        "compression": original / len(blob),
        "baseline_bytes": {},
        "baseline_compression": {},
        "report": {"layers": [t._asdict() for t in info.tensors]},
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        for mode in dict.fromkeys(r["mode"] for r in runs):
            group = [r for r in runs if r["model"] == name and r["mode"] == mode]
            if not group:
                continue
            drops = [100 * (r["dense_accuracy"] - r["archive_accuracy"]) for r in group]
            cpu = [r["cpu_seconds"] for r in group if "cpu_seconds" in r]  # not in older runs
            rows.append(
                {
                    "model": name,
                    "mode": mode,
                    "seeds": len(group),
                    "median_compression": statistics.median(r["compression"] for r in group),
                    "median_archive_bytes": statistics.median(r["archive_bytes"] for r in group),
                    "median_dense_accuracy": statistics.median(r["dense_accuracy"] for r in group),
                    "median_archive_accuracy": statistics.median(
                        r["archive_accuracy"] for r in group
                    ),
                    "median_drop_points": statistics.median(drops),
                    "max_drop_points": max(drops),
                    "median_seconds": statistics.median(r["seconds"] for r in group),
                    "median_cpu_seconds": statistics.median(cpu) if cpu else None,
                }
            )
    return rows


def plot(rows: list[dict], runs: list[dict], path: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        ax = fig.add_subplot(1, 2, i + 1)
        for j, mode in enumerate(dict.fromkeys(r["mode"] for r in runs)):
            group = [r for r in runs if r["model"] == name and r["mode"] == mode]
            label = mode if mode in ("default", "soft") else f"max drop {mode}"
            hollow = j % 2 == 0 and mode not in ("default", "soft")  # equal budgets overlap
            ax.scatter(
                [r["compression"] for r in group],
                [100 * (r["dense_accuracy"] - r["archive_accuracy"]) for r in group],
                label=f"ours, {label} (digits)",
                color="none" if hollow else f"C{j}",
                edgecolors=f"C{j}",
                s=90 if hollow else 30,
                linewidths=1.5,
            )
        for k, (who, ratio, _) in enumerate(PUBLISHED[name]):
            ax.axvline(ratio, color=f"C{k + 4}", linestyle=":", label=f"{who}: {ratio}x (MNIST)")
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        ax.set_xticks(
            [t for t in (20, 30, 40, 60, 100, 150, 200, 300, 400, 600) if low <= t <= high]
        )
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("compression (x, log scale)")
        ax.set_ylabel("test accuracy drop (points)")
        ax.set_title(name)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=["lenet300", "lenet5"], choices=MODELS)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["default", "0.5", "0.0", "soft"],
        help="'default', a max drop in points, or 'soft' (soft weight-sharing)",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, short training")
    parser.add_argument(
        "--prune-epochs",
        type=int,
        default=None,
        help="pruning and retraining epochs of every stage and probe (default: 60)",
    )
    parser.add_argument(
        "--validation",
        type=float,
        default=None,
        help="share of the training data the budget search validates on (default: 0.1)",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=None,
        help="validation folds of the budget search (default: 3)",
    )
    parser.add_argument(
        "--distill",
        type=float,
        default=None,
        help="distillation weight of the pruning and fine-tuning stages (default: 0.5 under a "
        "budget, 0 without)",
    )
    parser.add_argument("--plot", default=None, help="write the frontier figure here")
    parser.add_argument("--out", default="pipeline.json", help="JSON file in benchmarks/results")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    short = {"epochs": 5, "prune_epochs": 6, "finetune_epochs": 2} if args.quick else {}
    if args.prune_epochs is not None:
        short["prune_epochs"] = args.prune_epochs
    if args.validation is not None:
        short["validation"] = args.validation
    if args.folds is not None:
        short["folds"] = args.folds
    if args.distill is not None:
        short["distill"] = args.distill
    data = load_digits()
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "devices": str(jax.devices()),
    }
    runs: list[dict] = []
    for seed in seeds:
        for name in args.models:
            for mode in args.modes:
                if mode == "soft":
                    runs.append(run_soft(name, seed, data, short))
                else:
                    runs.append(run_one(name, mode, seed, data, short, out_dir))
                rows = summarise(runs)
                result = {
                    "machine": machine,
                    "quick": args.quick,
                    "summary": rows,
                    "published_mnist": PUBLISHED,
                    "runs": runs,
                }
                # Written after every run, so an interrupted benchmark keeps what it measured.
                with open(os.path.join(out_dir, args.out), "w") as file:
                    json.dump(result, file, indent=1)
    rows = summarise(runs)
    print(json.dumps(rows, indent=1))
    print("Published (MNIST, for scale):")
    for name in args.models:
        for who, ratio, error in PUBLISHED[name]:
            print(f"  {name}: {who}: {ratio}x, test error {error}")
    if args.plot is not None:
        plot(rows, runs, args.plot)


if __name__ == "__main__":
    main()
