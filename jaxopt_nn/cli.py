"""The ``jaxopt-nn`` command.

Each subcommand has one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to ``_<name>(args) -> None``; :func:`main` runs
it and turns ``ValueError``/``OSError``/``ImportError`` into one ``error:`` line on stderr
and exit status 1. Usage errors give one line and status 2.

Example::

    jaxopt-nn compress                               # Deep Compression of LeNet-300-100 on digits
    jaxopt-nn compress --model lenet300 --data ./mnist --out mnist.jnz --plot report.png
    jaxopt-nn inspect model.jnz
    jaxopt-nn evaluate model.jnz --data digits
    jaxopt-nn train --model resnet20 --epochs 5 --data ./mnist
    jaxopt-nn slim --model resnet20 --fraction 0.5 --out slim.jnz   # remove half the channels
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

PROG = "jaxopt-nn"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line on stderr."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, ok: Callable[[Any], bool], allowed: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and checks ``ok``; errors say what is allowed."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text!r}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_at_least_two = _number(int, lambda v: v >= 2, "an integer >= 2")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
_sparsity = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
_non_negative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
_open_fraction = _number(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)")
_unit_float = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
# Codebook widths: pipeline.MAX_BITS (kept here to spare jax's import at parse time).
_MAX_BITS = 16
_bits = _number(int, lambda v: 1 <= v <= _MAX_BITS, f"an integer in [1, {_MAX_BITS}]")


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_count(text: str) -> int | None:
    """``none``, or a byte count with an optional binary unit: ``4G``, ``512MiB``, ``1000``."""
    if text.strip().lower() == "none":
        return None
    digits = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = digits[-1:] if digits[-1:] in _BYTE_UNITS else ""
    number = digits.removesuffix(unit) if unit else digits
    if not number.isdigit():
        raise argparse.ArgumentTypeError(
            f"must be 'none' or a byte count such as 1000, 512M or 4GiB; got {text!r}"
        )
    return int(number) * _BYTE_UNITS[unit]


def _add_max_bytes(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--max-bytes",
        type=_byte_count,
        default=1 << 32,
        help=f"refuse {what} declaring more bytes than this, before reading it "
        "(e.g. 512M, 16GiB, none); default: 4GiB",
    )


def _lenet300(in_shape: tuple[int, ...], num_classes: int, rngs):
    from jaxopt_nn.models import LeNet300100

    return LeNet300100(math.prod(in_shape), num_classes, rngs=rngs)


def _lenet5(in_shape: tuple[int, ...], num_classes: int, rngs):
    from jaxopt_nn.models import LeNet5

    # The classic VALID network on MNIST-sized inputs, SAME padding below.
    padding = "VALID" if min(in_shape[:2]) >= 28 else "SAME"
    return LeNet5(in_shape, num_classes, padding=padding, rngs=rngs)


def _small_cnn(in_shape: tuple[int, ...], num_classes: int, rngs):
    from jaxopt_nn.models import SmallCNN

    return SmallCNN(in_shape, num_classes, rngs=rngs)


def _resnet20(in_shape: tuple[int, ...], num_classes: int, rngs):
    from jaxopt_nn.models import ResNet

    return ResNet(20, num_classes, in_channels=in_shape[-1], rngs=rngs)


# Model factories ``(in_shape (H, W, C), num_classes, rngs) -> nnx.Module``.
MODELS: dict[str, Callable] = {
    "lenet300": _lenet300,
    "lenet5": _lenet5,
    "cnn": _small_cnn,
    "resnet20": _resnet20,
}


_DATA_HELP = (
    "'digits' (built in, default), a directory of MNIST IDX files, or an .npz file "
    "with x_train, y_train, x_test, y_test"
)


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help=_DATA_HELP)


def _add_training(parser: argparse.ArgumentParser, *, epochs: int, batch_size: int) -> None:
    """The options shared by ``train`` and ``compress``."""
    parser.add_argument(
        "--model", choices=list(MODELS), default="lenet300", help="default: lenet300"
    )
    _add_data(parser)
    parser.add_argument(
        "--epochs", type=_positive_int, default=epochs, help=f"dense epochs; default: {epochs}"
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=batch_size, help=f"default: {batch_size}"
    )
    parser.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="Adam step size; default: 1e-3"
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="default: 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _make_model(name: str, in_shape: Sequence[int], num_classes: int, seed: int):
    from flax import nnx

    return MODELS[name](tuple(in_shape), num_classes, nnx.Rngs(seed))


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model and print its accuracy",
        description="Train a model with Adam and print a table of train/test loss and accuracy.",
    )
    _add_training(parser, epochs=20, batch_size=128)
    _add_max_bytes(parser, "a data file")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from jaxopt_nn import data as data_lib
    from jaxopt_nn import train as train_lib
    from jaxopt_nn.optim import adam
    from jaxopt_nn.tree import count_params

    dataset = data_lib.load(args.data, max_bytes=args.max_bytes)
    model = _make_model(args.model, dataset.in_shape, dataset.num_classes, args.seed)
    start = time.perf_counter()
    result = train_lib.fit(
        model,
        adam(args.lr),
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    last = result.history[-1]
    table = Table(title=f"{args.model} on {args.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("parameters", f"{count_params(result.state.params):,}"),
        ("train examples", f"{len(dataset.x_train):,}"),
        ("epochs", str(args.epochs)),
        ("train loss", f"{last['train_loss']:.4f}"),
        ("train accuracy", f"{last['train_accuracy']:.2%}"),
        ("test loss", f"{last['test_loss']:.4f}"),
        ("test accuracy", f"{last['test_accuracy']:.2%}"),
        ("seconds", f"{seconds:.1f}"),
    ]
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _per_layer(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """Parse ``VALUE`` or ``LAYER=VALUE,LAYER=VALUE``.

    Layer names are those of the compress table and ``inspect`` with or
    without their ``params/`` prefix (``params/fc1/kernel`` or ``fc1/kernel``).
    """

    def parse(text: str) -> Any:
        if "=" not in text:
            return kind(text)
        out = {}
        for item in text.split(","):
            layer, sep, value = item.partition("=")
            if not sep or not layer.strip():
                raise argparse.ArgumentTypeError(f"expected LAYER=VALUE; got {item!r}")
            out[layer.strip().removeprefix("params/")] = kind(value)
        return out

    return parse


def _add_compress(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compress",
        help="Deep Compression: train, prune, share weights, write a Huffman-coded archive",
        description="Train a model, prune it gradually with retraining, share its weights "
        "with k-means and fine-tune the centroids, then write a compressed archive and "
        "print the per-layer table and the compression.",
    )
    _add_training(parser, epochs=30, batch_size=64)
    parser.add_argument(
        "--prune-epochs",
        type=_at_least_two,
        default=60,
        help="epochs of gradual pruning and retraining; default: 60",
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_non_negative_int,
        default=15,
        help="epochs of centroid fine-tuning; default: 15",
    )
    parser.add_argument(
        "--sparsity",
        type=_per_layer(_sparsity),
        default=None,
        help="pruned fraction in [0, 1) for every layer, or LAYER=S,LAYER=S (e.g. "
        "fc1/kernel=0.9); default: fc 0.95, output layer 0.85, conv 0.7",
    )
    parser.add_argument(
        "--bits",
        type=_per_layer(_bits),
        default=None,
        help=f"codebook bits in [1, {_MAX_BITS}] for every layer, or LAYER=B,...; "
        "default: fc 5, conv 8",
    )
    parser.add_argument("--out", default="model.jnz", help="archive path; default: model.jnz")
    parser.add_argument("--plot", default=None, help="write a figure of the run (needs matplotlib)")
    parser.add_argument("--json", default=None, help="write the report as JSON")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="list every leaf in the per-layer table (default: raw leaves grouped)",
    )
    parser.add_argument(
        "--max-drop",
        type=_non_negative_float,
        default=None,
        help="accuracy budget in points: search per-layer sparsity and bits, on the dense model "
        "and on copies with half and three quarters of its channels removed, for the smallest "
        "archive within it, measured on a validation split (not with --sparsity/--bits)",
    )
    parser.add_argument(
        "--validation",
        type=_open_fraction,
        default=0.1,
        help="share of the training data held out for --max-drop (per fold); default: 0.1",
    )
    parser.add_argument(
        "--folds",
        type=_positive_int,
        default=None,
        help="validation folds of --max-drop: each holds out its own split and trains its own "
        "models, and the budget applies to the images of all folds; default: 3",
    )
    parser.add_argument(
        "--distill",
        type=_unit_float,
        default=None,
        help="weight in [0, 1] of the distillation from the dense model in the pruning and "
        "fine-tuning stages; default: 0.5 with --max-drop, 0 without",
    )
    parser.add_argument(
        "--slim",
        type=_sparsity,
        default=None,
        help="first remove this fraction of the channels of every group (as 'slim' does, "
        "with --slim-epochs of fine-tuning per step), then compress the smaller model",
    )
    parser.add_argument(
        "--slim-epochs",
        type=_positive_int,
        default=5,
        help="fine-tuning epochs after each of the 3 channel-removal steps; default: 5",
    )
    _add_int8(parser)
    parser.set_defaults(func=_compress)


def _compress(args: argparse.Namespace) -> None:
    import json

    from jaxopt_nn import archive, pipeline
    from jaxopt_nn import data as data_lib

    # Output paths are checked before the minutes of training, not after.
    pipeline.check_output_path("--out", args.out)
    if args.json is not None:
        pipeline.check_output_path("--json", args.json)
    if args.plot is not None:
        pipeline.check_plot_path(args.plot)
    dataset = data_lib.load(args.data)
    model = _make_model(args.model, dataset.in_shape, dataset.num_classes, args.seed)
    metadata = {
        "model": args.model,
        "in_shape": list(dataset.in_shape),
        "num_classes": dataset.num_classes,
    }
    epochs = args.epochs
    if args.slim:
        model = _slim_first(args, dataset)
        metadata.update(structured=True, fraction=args.slim)
        epochs = 1  # the smaller model is trained; its 'dense' stage only re-measures it
    report = pipeline.deep_compress(
        model,
        dataset,
        sparsity=args.sparsity,
        bits=args.bits,
        epochs=epochs,
        prune_epochs=args.prune_epochs,
        finetune_epochs=args.finetune_epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        path=args.out,
        metadata=metadata,
        progress=not args.quiet,
        max_drop=args.max_drop,
        validation=args.validation,
        folds=args.folds,
        distill=args.distill,
    )
    print(report.table(verbose=args.verbose))
    print()
    print(report.stage_table())
    int8 = {}
    if args.int8 is not None:
        print()
        print(f"int8 stage (the compressed model of {args.out}):")
        int8 = {"int8": _int8_stage(_archived_model(args, dataset), dataset, args.int8)}
    if args.json is not None:
        text = json.dumps({**report.to_dict(), "metadata": metadata, **int8}, indent=1)
        archive.write_atomic(args.json, text.encode())
    if args.plot is not None:
        pipeline.plot_report(report, args.plot)
    if report.search is not None:
        print(report.search_summary())
    print(f"archive: {args.out} ({report.info.file_bytes:,} bytes)")
    print(report.summary())


def _archived_model(args: argparse.Namespace, dataset: Any) -> Any:
    """The model of ``args.model`` holding the weights of the archive ``args.out``."""
    import optax
    from flax import nnx

    from jaxopt_nn import archive, pipeline
    from jaxopt_nn import train as train_lib

    model = _make_model(args.model, dataset.in_shape, dataset.num_classes, args.seed)
    stored = archive.load(args.out)
    if (archive.inspect(args.out).metadata or {}).get("structured"):  # --slim or the search
        model = _slimmed(model, stored)
    graphdef, like = train_lib.init_train_state(model, optax.identity())
    state = pipeline.restore_state(like, stored)
    return nnx.merge(graphdef, state.params, state.rest)


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print the per-tensor storage of an archive",
        description="Check an archive's checksums and print how each tensor is stored.",
    )
    parser.add_argument("archive", help="a .jnz file written by 'compress'")
    _add_max_bytes(parser, "an archive")
    parser.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> None:
    from jaxopt_nn import archive

    info = archive.inspect(args.archive, max_bytes=args.max_bytes)
    print(info.table())
    if info.metadata:
        text = ", ".join(f"{k}={v}" for k, v in info.metadata.items())
        print("metadata: " + archive.printable(text))


_INT8_HELP = (
    "also run the integer model (int8 x int8 -> int32 layers, batch norms folded) and print its "
    "accuracy and latency (batch 128) beside float32: 'dynamic' (default) per-row activation "
    "scales, or 'static' ranges calibrated on the training data"
)


def _add_int8(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--int8",
        nargs="?",
        const="dynamic",
        default=None,
        choices=["dynamic", "static"],
        help=_INT8_HELP,
    )


def _int8_stage(model: Any, dataset: Any, mode: str) -> dict[str, Any]:
    """Accuracy and interleaved latency of ``model`` and its int8 twin; prints a table."""
    import jax.numpy as jnp
    import optax

    from jaxopt_nn import integer, speed
    from jaxopt_nn import train as train_lib

    model = integer.fold_batchnorm(model)
    x = jnp.asarray(dataset.x_test[:128])
    calibration = None
    if mode == "static":
        train_x = dataset.x_train
        batches = [jnp.asarray(train_x[i : i + 256]) for i in range(0, len(train_x), 256)]
        calibration = integer.calibrate(model, batches)
    q = integer.to_int8(model, calibration, example=x)
    plan = integer.int8_plan(model, example=x)
    accuracy = {}
    for variant, m in (("float32", model), (f"int8-{mode}", q)):
        graphdef, state = train_lib.init_train_state(m, optax.identity())
        metrics = train_lib.evaluate(graphdef, state, dataset.x_test, dataset.y_test)
        accuracy[variant] = metrics["accuracy"]
    timing = speed.compare_latency(model, q, x)
    print(f"{'variant':14s} {'test accuracy':>13s} {'latency (batch 128)':>20s} {'speed-up':>9s}")
    for variant, seconds in zip(accuracy, (timing.baseline, timing.candidate), strict=True):
        ratio = timing.baseline / seconds
        print(f"{variant:14s} {accuracy[variant]:13.2%} {seconds * 1e3:17.3f} ms {ratio:8.2f}x")
    kept = [f"{name} {why.removeprefix('float32 ')}" for name, why in plan.items() if why != "int8"]
    print("int8 layers: " + (", ".join(n for n, why in plan.items() if why == "int8") or "none"))
    if kept:
        print("kept in float32: " + ", ".join(kept))
    return {
        "mode": mode,
        "accuracy": accuracy,
        "latency_s": {"float32": timing.baseline, f"int8-{mode}": timing.candidate},
        "speedup": timing.speedup,
        "plan": plan,
    }


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="test accuracy of the model in an archive",
        description="Load an archive written by 'compress' and evaluate it on a data set.",
    )
    parser.add_argument("archive", help="a .jnz file written by 'compress'")
    _add_data(parser)
    parser.add_argument(
        "--model",
        choices=list(MODELS),
        default=None,
        help="the architecture; default: the one recorded in the archive",
    )
    _add_max_bytes(parser, "an archive or data file")
    _add_int8(parser)
    parser.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> None:
    import optax

    from jaxopt_nn import archive, pipeline
    from jaxopt_nn import data as data_lib
    from jaxopt_nn import train as train_lib

    info = archive.inspect(args.archive, max_bytes=args.max_bytes)
    stored = archive.load(args.archive, max_bytes=args.max_bytes)
    metadata = info.metadata or {}
    name = args.model or metadata.get("model")
    if name is None:
        raise ValueError(f"{args.archive} records no model; pass --model {{{','.join(MODELS)}}}")
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"{args.archive} records model {name!r}; known: {', '.join(MODELS)}")
    num_classes = metadata.get("num_classes")
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ValueError(
            f"{args.archive} records num_classes={num_classes!r}; expected an int >= 1"
        )
    dataset = data_lib.load(args.data, num_classes=num_classes, max_bytes=args.max_bytes)
    model = _make_model(name, dataset.in_shape, dataset.num_classes, 0)
    if metadata.get("structured"):
        model = _slimmed(model, stored)
    graphdef, like = train_lib.init_train_state(model, optax.identity())
    state = pipeline.restore_state(like, stored)
    metrics = train_lib.evaluate(graphdef, state, dataset.x_test, dataset.y_test)
    print(
        f"{name} from {args.archive} on {args.data}: test accuracy {metrics['accuracy']:.2%}, "
        f"loss {metrics['loss']:.4f} ({len(dataset.y_test):,} examples)"
    )
    if args.int8 is not None:
        from flax import nnx

        _int8_stage(nnx.merge(graphdef, state.params, state.rest), dataset, args.int8)


def _add_slim(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "slim",
        help="structured pruning: remove whole channels, measure the speed-up",
        description="Train a model, remove whole channels in steps with fine-tuning "
        "(dependency groups traced from the computation), print params, FLOPs, latency "
        "at batch 1 and 128 (dense measured in the same run) and accuracy per stage, and "
        "write the smaller model to an archive that 'evaluate' and 'inspect' read.",
    )
    _add_training(parser, epochs=10, batch_size=128)
    parser.add_argument(
        "--fraction",
        type=_sparsity,
        default=0.5,
        help="removed fraction of the channels of every group, in [0, 1); default: 0.5",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=3, help="prune/fine-tune steps; default: 3"
    )
    parser.add_argument(
        "--finetune-epochs",
        type=_positive_int,
        default=3,
        help="fine-tuning epochs after each step; default: 3",
    )
    parser.add_argument(
        "--criterion",
        choices=["l1", "l2", "bn", "taylor"],
        default="l2",
        help="channel importance; default: l2",
    )
    parser.add_argument(
        "--round-to",
        type=_positive_int,
        default=1,
        help="kept channel counts are multiples of this; default: 1",
    )
    parser.add_argument(
        "--distill",
        type=_unit_float,
        default=0.5,
        help="weight in [0, 1] of the distillation from the trained model in the fine-tuning "
        "loss (the rest: the labels); default: 0.5",
    )
    parser.add_argument("--out", default="slim.jnz", help="archive path; default: slim.jnz")
    parser.set_defaults(func=_slim)


def _slimmed(model: Any, stored: Any) -> Any:
    """``model`` resized to the arrays of an archive written by ``slim``."""
    from collections.abc import Mapping

    from jaxopt_nn import structured, tree

    if not isinstance(stored, Mapping):
        raise ValueError("archive holds no 'params' tree; was it written by slim?")
    arrays: dict[str, Any] = {}
    for part in ("params", "rest"):
        arrays.update(tree.leaves_with_names(stored.get(part, {})))
    return structured.resized(model, arrays)


def _slim_rows(dense: Any, stages: list[tuple[str, Any]], dataset: Any) -> list[list[Any]]:
    """Per stage: params, FLOPs, latency at batch 1 and 128 against ``dense``, accuracy."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxopt_nn import speed
    from jaxopt_nn import train as train_lib
    from jaxopt_nn.tree import count_params

    inputs = [jnp.asarray(dataset.x_test[:n]) for n in (1, 128)]
    rows = []
    for name, model in stages:
        graphdef, state = train_lib.init_train_state(model, optax.identity())
        accuracy = train_lib.evaluate(graphdef, state, dataset.x_test, dataset.y_test)
        row = [name, count_params(nnx.state(model, nnx.Param)), speed.count_flops(model, inputs[0])]
        for x in inputs:
            repeats = 20 if len(x) == 1 else 5
            if model is dense:
                seconds, speedup = speed.latency(dense, x, repeats=repeats, rounds=7), 1.0
            else:
                _, seconds, speedup = speed.compare_latency(dense, model, x, repeats=repeats)
            row += [f"{seconds * 1e3:.3f}", f"{speedup:.2f}x"]
        rows.append([*row[:2], f"{row[2]:,.0f}", *row[3:], f"{accuracy['accuracy']:.2%}"])
    return rows


def _slim_stages(
    args: argparse.Namespace,
    dataset: Any,
    fraction: float,
    *,
    epochs: int,
    steps: int = 3,
    criterion: str = "l2",
    round_to: int = 1,
    distill: float = 0.5,
) -> Any:
    """Train ``args.model``, remove ``fraction`` of its channels in ``steps``.

    Prints the table of the stages and returns the smallest model.
    """
    from jaxopt_nn import structured
    from jaxopt_nn import train as train_lib
    from jaxopt_nn.optim import adam
    from jaxopt_nn.tree import format_table

    model = _make_model(args.model, dataset.in_shape, dataset.num_classes, args.seed)
    result = train_lib.fit(
        model,
        adam(args.lr),
        dataset,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    dense = train_lib.to_model(result.graphdef, result.state)
    stages = structured.gradual_prune(
        dense,
        dataset,
        fraction,
        steps=steps,
        epochs=epochs,
        learning_rate=args.lr,
        criterion=criterion,
        round_to=round_to,
        distill=distill,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    named = [("dense", dense)] + [
        (f"step {i} ({s.fraction:.0%} removed)", s.model) for i, s in enumerate(stages, 1)
    ]
    headers = ["stage", "params", "FLOPs/example", "ms b1", "speed-up b1", "ms b128"]
    headers.append("speed-up b128")
    print(format_table([*headers, "accuracy"], _slim_rows(dense, named, dataset)))
    return stages[-1].model


def _slim_first(args: argparse.Namespace, dataset: Any) -> Any:
    """``compress --slim``: the trained model with ``args.slim`` of its channels removed."""
    print(f"structured pruning: {args.slim:.0%} of the channels of every group")
    small = _slim_stages(args, dataset, args.slim, epochs=args.slim_epochs)
    print()
    return small


def _slim(args: argparse.Namespace) -> None:
    from flax import nnx

    from jaxopt_nn import archive, pipeline
    from jaxopt_nn import data as data_lib

    pipeline.check_output_path("--out", args.out)
    dataset = data_lib.load(args.data)
    small = _slim_stages(
        args,
        dataset,
        args.fraction,
        epochs=args.finetune_epochs,
        steps=args.steps,
        criterion=args.criterion,
        round_to=args.round_to,
        distill=args.distill,
    )
    tree = {"params": nnx.to_pure_dict(nnx.state(small, nnx.Param))}
    rest = nnx.to_pure_dict(nnx.state(small, nnx.BatchStat))
    if rest:
        tree["rest"] = rest
    metadata = {
        "model": args.model,
        "in_shape": list(dataset.in_shape),
        "num_classes": dataset.num_classes,
        "structured": True,
        "fraction": args.fraction,
    }
    size = archive.save(args.out, tree, metadata=metadata)
    print(f"archive: {args.out} ({size:,} bytes)")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Train and compress neural networks with JAX.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_compress, _add_inspect, _add_evaluate, _add_slim, _add_train):
        add(subparsers)
    return parser


def _run(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a subcommand; expected failures become one line on stderr."""
    try:
        func(args)
    except (ValueError, OSError, ImportError) as err:
        from jaxopt_nn.archive import printable  # messages quote names read from files

        message = printable(" ".join(str(err).split()))
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxopt-nn``; returns the exit status.

    Args:
      argv: the arguments after the program name; default ``sys.argv[1:]``.

    Returns:
      0 on success, 1 if the command failed, 2 for a usage error.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already reported
        return exit_.code if isinstance(exit_.code, int) else 2
    return _run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
