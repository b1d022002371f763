"""Structured pruning benchmark: FLOPs, measured latency and accuracy on digits.

For LeNet-300-100, LeNet-5 and ResNet-20 on scikit-learn's digits (8x8):

1. train the dense model;
2. for several fractions, :func:`jaxopt_nn.structured.gradual_prune`
   (channels removed in three steps, each followed by fine-tuning with a
   cosine learning-rate decay and distillation from the dense model) gives a
   physically smaller model;
3. report params, FLOPs (XLA cost analysis), latency at batch 1 and 128
   measured against the dense model in the same run (interleaved rounds of
   back-to-back calls, :func:`jaxopt_nn.speed.compare_latency`), the latency
   speed-up divided by the FLOPs reduction, and test accuracy (450 examples:
   one example is 0.22 points);
4. masked-only baseline at the headline fraction: the same channels zeroed by
   :func:`jaxopt_nn.structured.channel_masks` and fine-tuned with the masks
   applied to the parameters (group-aware pruning without shrinking). It has
   the dense shapes, hence the dense speed; shrinking it afterwards gives the
   same outputs at the smaller model's speed.

Run: ``python benchmarks/structured.py [--quick] [--model NAME ...]``; writes
``benchmarks/results/structured.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_nn import data, models, speed, structured, train
from jaxopt_nn.tree import count_params

MODELS = {
    "LeNet-300-100": (lambda r: models.LeNet300100(64, rngs=r), (0.5, 0.6, 0.7, 0.75), 0.7),
    "LeNet-5": (
        lambda r: models.LeNet5((8, 8, 1), padding="SAME", rngs=r),
        (0.5, 0.75),
        0.75,
    ),
    "ResNet-20": (lambda r: models.ResNet(20, in_channels=1, rngs=r), (0.4, 0.5), 0.4),
}
DISTILL = 0.5  # weight of the distillation from the dense model while fine-tuning


def _accuracy(model: nnx.Module, dataset: data.Dataset, param_transform=None) -> float:
    graphdef, state = train.init_train_state(model, optax.identity())
    metrics = train.evaluate(
        graphdef, state, dataset.x_test, dataset.y_test, param_transform=param_transform
    )
    return float(metrics["accuracy"])


def _latency(dense: nnx.Module, model: nnx.Module, dataset: data.Dataset, rounds: int) -> dict:
    out = {}
    for batch, repeats in ((1, 40), (128, 8)):
        x = jnp.asarray(dataset.x_test[:batch])
        timing = speed.compare_latency(dense, model, x, repeats=repeats, rounds=rounds)
        out[f"b{batch}"] = {
            "dense_ms": timing.baseline * 1e3,
            "ms": timing.candidate * 1e3,
            "speedup": timing.speedup,
        }
    return out


def _row(name, model, dense, dataset, rounds, accuracy=None) -> dict:
    x1 = jnp.asarray(dataset.x_test[:1])
    flops_ratio = speed.count_flops(dense, x1) / speed.count_flops(model, x1)
    timing = _latency(dense, model, dataset, rounds)
    return {
        "stage": name,
        "params": count_params(nnx.state(model, nnx.Param)),
        "flops": speed.count_flops(model, x1),
        "flops_ratio": flops_ratio,
        "accuracy": _accuracy(model, dataset) if accuracy is None else accuracy,
        "latency": timing,
        "b128_speedup_over_flops_ratio": timing["b128"]["speedup"] / flops_ratio,
    }


def _masked_baseline(dense, dataset, fraction, epochs, rounds) -> list[dict]:
    """Group masks from one ranking, fine-tuned as masks, then shrunk."""
    x = jnp.asarray(dataset.x_train[:2])
    groups = structured.dependency_groups(dense, x)
    keep = structured.keep_top(structured.group_importance(dense, groups, "l2"), fraction)
    masks = structured.channel_masks(dense, groups, keep)

    def apply(params):
        return jax.tree.map(jnp.multiply, params, masks)

    result = train.fit(
        dense, optax.adam(1e-3), dataset, epochs=epochs, param_transform=apply, progress=False
    )
    graphdef, state = result.graphdef, result.state
    state = state._replace(params=apply(state.params))  # the zeros for real
    masked = train.to_model(graphdef, state)
    accuracy = _accuracy(masked, dataset)
    small = structured.shrink(masked, groups, keep)
    small.eval()
    x128 = jnp.asarray(dataset.x_test[:128])
    difference = float(jnp.abs(small(x128) - masked(x128)).max())
    return [
        {**_row("masked only", masked, dense, dataset, rounds, accuracy), "fraction": fraction},
        {
            **_row("masked, then shrunk", small, dense, dataset, rounds),
            "fraction": fraction,
            "max_logit_difference_to_masked": difference,
        },
    ]


DENSE_EPOCHS = {"LeNet-300-100": 20, "LeNet-5": 15, "ResNet-20": 12}
FINETUNE_EPOCHS = {"LeNet-300-100": 15, "LeNet-5": 10, "ResNet-20": 8}  # per step


def run(quick: bool, names: list[str], save: Callable[[str, list[dict]], None]) -> None:
    dataset = data.load_digits()
    rounds = 5 if quick else 21
    for name in names:
        make, fractions, headline = MODELS[name]
        epochs = 2 if quick else DENSE_EPOCHS[name]
        finetune = 1 if quick else FINETUNE_EPOCHS[name]
        fit = train.fit(make(nnx.Rngs(0)), optax.adam(1e-3), dataset, epochs=epochs, progress=False)
        dense = train.to_model(fit.graphdef, fit.state)
        rows = [_row("dense", dense, dense, dataset, rounds)]
        rows[0]["fraction"] = 0.0
        for fraction in fractions[:1] if quick else fractions:
            stages = structured.gradual_prune(
                dense, dataset, fraction, steps=3, epochs=finetune, distill=DISTILL, seed=1
            )
            row = _row(f"slim {fraction:.0%}", stages[-1].model, dense, dataset, rounds)
            rows.append({**row, "fraction": fraction})
            print(name, row["stage"], row["accuracy"], row["latency"]["b128"]["speedup"])
        rows += _masked_baseline(dense, dataset, headline, 3 * finetune, rounds)  # same epochs
        save(name, rows)  # after every model: a partial result survives an interrupted run


def _table(results: dict) -> str:
    lines = [
        "| model | stage | params | FLOPs ratio | speed-up b1 | speed-up b128 "
        "| b128 / FLOPs | accuracy |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():
        for r in rows:
            lines.append(
                f"| {name} | {r['stage']} | {r['params']:,} | {r['flops_ratio']:.2f}x | "
                f"{r['latency']['b1']['speedup']:.2f}x | {r['latency']['b128']['speedup']:.2f}x | "
                f"{r['b128_speedup_over_flops_ratio']:.2f} | {r['accuracy']:.2%} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, one fraction")
    parser.add_argument(
        "--model",
        action="append",
        choices=list(MODELS),
        help="run only these models (repeatable), replacing their rows in the results file",
    )
    args = parser.parse_args()
    out = Path(__file__).parent / "results" / "structured.json"
    results: dict = {}
    load: dict = {}

    def save(name: str, rows: list[dict]) -> None:
        if args.model and out.exists():  # re-read: another run may have added a model
            previous = json.loads(out.read_text())
            results.update(previous.get("results", {}))
            load.update(previous.get("load_average_per_model", {}))
        results[name] = rows
        load[name] = os.getloadavg()  # 1, 5, 15 minutes, when the model's rows were done
        print(_table({name: rows}))
        if args.quick:
            return
        payload = {
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
                "jax": jax.__version__,
                "backend": jax.default_backend(),
            },
            "load_average_per_model": load,
            "dense_epochs": DENSE_EPOCHS,
            "finetune_epochs_per_step": FINETUNE_EPOCHS,
            "steps": 3,
            "finetune": "Adam, cosine decay from 1e-3 per step; distillation weight "
            f"{DISTILL} (temperature 4)",
            "latency": "rounds of back-to-back calls, dense and candidate interleaved; "
            "ms: medians over the rounds, speed-up: median of the rounds' ratios; "
            "b1: 40 calls per round, b128: 8",
            "latency_rounds": 21,
            "complete": set(results) == set(MODELS),
            "results": {name: results[name] for name in MODELS if name in results},
            "table": _table({name: results[name] for name in MODELS if name in results}),
        }
        out.write_text(json.dumps(payload, indent=2, default=float))

    run(args.quick, args.model or list(MODELS), save)
    if not args.quick:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
