"""The ``jaxopt-nn`` command.

Each subcommand has one ``_add_<name>(subparsers)`` function that declares its
arguments and sets ``func`` to ``_<name>(args) -> None``; :func:`main` runs
it and turns ``ValueError``/``OSError`` into one ``error:`` line on stderr
and exit status 1. Usage errors give one line and status 2.

Example::

    jaxopt-nn train                                  # LeNet-300-100 on digits
    jaxopt-nn train --model resnet20 --epochs 5 --data ./mnist
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence

PROG = "jaxopt-nn"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a single line on stderr."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {text!r}")
    return value


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


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model and print its accuracy",
        description="Train a model with Adam and print a table of train/test loss and accuracy.",
    )
    parser.add_argument(
        "--model", choices=list(MODELS), default="lenet300", help="default: lenet300"
    )
    parser.add_argument(
        "--data",
        default="digits",
        help="'digits' (built in, default), a directory of MNIST IDX files, or an .npz file "
        "with x_train, y_train, x_test, y_test",
    )
    parser.add_argument("--epochs", type=_positive_int, default=20, help="default: 20")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="default: 128")
    parser.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="Adam step size; default: 1e-3"
    )
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="default: 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> None:
    import optax
    from flax import nnx
    from rich.console import Console
    from rich.table import Table

    from jaxopt_nn import data as data_lib
    from jaxopt_nn import train as train_lib
    from jaxopt_nn.tree import count_params

    dataset = data_lib.load(args.data)
    model = MODELS[args.model](dataset.in_shape, dataset.num_classes, nnx.Rngs(args.seed))
    start = time.perf_counter()
    result = train_lib.fit(
        model,
        optax.adam(args.lr),
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


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Train and compress neural networks with JAX.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train,):
        add(subparsers)
    return parser


def _run(func: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a subcommand; expected failures become one line on stderr."""
    try:
        func(args)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
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
