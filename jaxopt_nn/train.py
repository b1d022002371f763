"""Jit-compiled training over an NNX model split into pure state.

The model is split once into a static ``graphdef`` and a :class:`TrainState`
of arrays: ``params`` (every ``nnx.Param``), ``rest`` (everything else, e.g.
batch-norm statistics or pruning masks) and the optax ``opt_state``. A step is
a pure function ``step(state, x, y) -> (state, metrics)``; it merges the model
inside the trace, so any optax transform, ``jax.jit`` with donated buffers,
shardings or ``pmap`` can be used around it.

Mode: the train step puts the merged model in training mode
(``model.train()``: batch statistics, running averages updated), the eval step
in evaluation mode (``model.eval()``: running averages). The flags are Python
attributes read while tracing, so each step compiles its own mode whatever the
mode of the model that was split.

Loss hook: ``loss_fn(model, x, y) -> (loss, logits)`` receives the merged
model in training mode; the logits give the accuracy metric. The default is
:func:`cross_entropy_loss` on ``model(x)``; :func:`auxiliary_loss_fn` adds the
auxiliary heads of a ``ResNet(aux_heads=True)``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_nn.data import Dataset, batches
from jaxopt_nn.models import auxiliary_loss

LossFn = Callable[[nnx.Module, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
ParamTransform = Callable[[nnx.State], nnx.State]


class TrainState(NamedTuple):
    """Everything a train step reads and writes, as pytrees of arrays."""

    params: nnx.State  # the model's nnx.Param leaves
    rest: nnx.State  # every other variable (BatchStat, masks, ...)
    opt_state: optax.OptState  # tx.init(params)


class FitResult(NamedTuple):
    """What :func:`fit` returns."""

    graphdef: nnx.GraphDef  # static structure of the model
    state: TrainState  # final state
    history: list[dict[str, float]]  # one record per epoch


def init_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` into its graphdef and a fresh :class:`TrainState`.

    The arrays are copied, so donating the state in a train step leaves
    ``model`` usable.

    Args:
      model: an NNX module.
      tx: the optax transform; its state is ``tx.init(params)``.

    Returns:
      ``(graphdef, state)``; ``nnx.merge(graphdef, state.params, state.rest)``
      rebuilds the model (see :func:`to_model`).

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> graphdef, state = init_train_state(LeNet300100(64, rngs=nnx.Rngs(0)), optax.sgd(0.1))
      >>> state.params['fc3']['kernel'].shape
      (100, 10)
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    return graphdef, TrainState(params, rest, tx.init(params))


def to_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuild the NNX model from a :class:`TrainState`, in evaluation mode."""
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    return model


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels.

    .. math::
      L = -\\frac{1}{B} \\sum_b \\log \\operatorname{softmax}(z_b)_{y_b}

    Args:
      logits: ``(batch, num_classes)``.
      labels: ``(batch,)`` integer class indices.

    Returns:
      A float32 scalar.

    Example:
      >>> round(float(cross_entropy_loss(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
      1.3863
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _default_loss(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    return cross_entropy_loss(logits, y), logits


def auxiliary_loss_fn(*, lam: float = 0.3) -> LossFn:
    """A ``loss_fn`` for models with auxiliary heads: ``L_main + lam * sum(L_aux)``.

    The model is called as ``model(x, return_aux=True) -> (logits, aux_logits)``
    (see :class:`jaxopt_nn.models.ResNet`); every term is
    :func:`cross_entropy_loss`, combined by
    :func:`jaxopt_nn.models.auxiliary_loss`.

    Args:
      lam: weight of the auxiliary losses, ``>= 0``.

    Returns:
      ``loss_fn(model, x, y) -> (loss, main_logits)`` for :func:`make_train_step`.

    Raises:
      ValueError: if ``lam`` is negative.
    """
    if isinstance(lam, (int, float)) and lam < 0:
        raise ValueError(f"lam must be >= 0; got lam={lam!r}")

    def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, aux_logits = model(x, return_aux=True)
        aux_losses = [cross_entropy_loss(a, y) for a in aux_logits]
        return auxiliary_loss(cross_entropy_loss(logits, y), aux_losses, lam), logits

    return loss_fn


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    loss_fn: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    jit: bool = True,
    donate: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Build ``step(state, x, y) -> (state, metrics)`` for one optimisation step.

    The step merges the model in training mode, differentiates
    ``loss_fn(model, x, y)`` with respect to ``state.params`` (through
    ``param_transform`` if given, e.g. fake quantization), applies
    ``tx.update(grads, opt_state, params)`` and ``optax.apply_updates``, and
    keeps the updated non-parameter state (batch statistics).

    Args:
      graphdef: from :func:`init_train_state`.
      tx: any optax transform (extra-args transforms receive none).
      loss_fn: ``(model, x, y) -> (scalar loss, logits)``; default
        cross-entropy of ``model(x)``.
      param_transform: ``params -> params`` applied before the forward pass;
        gradients flow through it to the stored params.
      jit: return the step jit-compiled; ``False`` returns the plain function
        for your own ``jit``/shardings/``pmap``.
      donate: donate the input state's buffers to the jitted step (the state
        passed in must not be used again).

    Returns:
      The step; ``metrics`` holds float32 scalars ``'loss'`` and ``'accuracy'``.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> graphdef, state = init_train_state(LeNet300100(4, 2, rngs=nnx.Rngs(0)), optax.sgd(0.1))
      >>> step = make_train_step(graphdef, optax.sgd(0.1))
      >>> x, y = jnp.ones((8, 4)), jnp.zeros(8, jnp.int32)
      >>> state, first = step(state, x, y)
      >>> state, second = step(state, x, y)
      >>> bool(second['loss'] < first['loss'])
      True
    """
    loss_fn = _default_loss if loss_fn is None else loss_fn
    transform = (lambda p: p) if param_transform is None else param_transform

    def step(
        state: TrainState, x: jax.Array, y: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        def objective(params: nnx.State) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
            model = nnx.merge(graphdef, transform(params), state.rest, copy=True)
            model.train()
            loss, logits = loss_fn(model, x, y)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (logits, rest)

        (loss, (logits, rest)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params: nnx.State = optax.apply_updates(state.params, updates)  # pyright: ignore[reportAssignmentType]
        metrics = {"loss": loss, "accuracy": _accuracy(logits, y)}
        return TrainState(params, rest, opt_state), metrics

    if not jit:
        return step
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    param_transform: ParamTransform | None = None,
    jit: bool = True,
) -> Callable[[TrainState, jax.Array, jax.Array], dict[str, jax.Array]]:
    """Build ``eval_step(state, x, y) -> metrics`` (model in evaluation mode).

    Args:
      graphdef: from :func:`init_train_state`.
      param_transform: ``params -> params`` applied before the forward pass.
      jit: return the step jit-compiled (the state is not donated).

    Returns:
      The step; ``metrics`` holds the mean ``'loss'`` (cross-entropy) and
      ``'accuracy'`` over the batch.
    """
    transform = (lambda p: p) if param_transform is None else param_transform

    def eval_step(state: TrainState, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, transform(state.params), state.rest)
        model.eval()
        logits = model(x)
        return {"loss": cross_entropy_loss(logits, y), "accuracy": _accuracy(logits, y)}

    return jax.jit(eval_step) if jit else eval_step


def _weighted_means(metrics: list[dict[str, jax.Array]], sizes: list[int]) -> dict[str, float]:
    stacked = jax.device_get(metrics)
    weights = np.asarray(sizes, np.float64)
    return {
        key: float(np.dot(weights, [m[key] for m in stacked]) / weights.sum()) for key in stacked[0]
    }


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got batch_size={batch_size!r}")


def _evaluate_with(
    eval_step: Callable[..., dict[str, jax.Array]],
    state: TrainState,
    x: Any,
    y: Any,
    batch_size: int,
) -> dict[str, float]:
    metrics, sizes = [], []
    for xb, yb in batches(x, y, batch_size, seed=0, shuffle=False):
        metrics.append(eval_step(state, xb, yb))
        sizes.append(len(yb))
    if not metrics:  # an empty test set
        return {"loss": math.nan, "accuracy": math.nan}
    return _weighted_means(metrics, sizes)


def evaluate(
    graphdef: nnx.GraphDef,
    state: TrainState,
    x: Any,
    y: Any,
    *,
    batch_size: int = 1024,
    param_transform: ParamTransform | None = None,
) -> dict[str, float]:
    """Mean cross-entropy ``'loss'`` and ``'accuracy'`` over ``(x, y)``, in batches.

    Args:
      graphdef: from :func:`init_train_state`.
      state: the :class:`TrainState` to evaluate.
      x: inputs ``(N, ...)``.
      y: integer labels ``(N,)``.
      batch_size: examples per forward pass.
      param_transform: ``params -> params`` applied before the forward pass.

    Returns:
      ``{'loss': float, 'accuracy': float}`` weighted by batch size.

    Raises:
      ValueError: if ``batch_size`` is not a positive int or ``x`` is empty.
    """
    _check_batch_size(batch_size)
    if len(x) == 0:
        raise ValueError("x must hold at least one example; got len(x)=0")
    eval_step = make_eval_step(graphdef, param_transform=param_transform)
    return _evaluate_with(eval_step, state, x, y, batch_size)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, stage: str) -> Iterator[Callable[..., None]]:
    """Yield ``advance(description=None)``; draws a rich progress bar named ``stage`` on stderr."""
    if not enabled:
        yield lambda description=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(stage, total=total)

        def advance(description: str | None = None) -> None:
            if description is None:
                bar.advance(task)
            else:
                bar.update(task, description=f"{stage}  {description}")

        yield advance


def _check_fit_args(epochs: object, batch_size: object, stage: object) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int; got epochs={epochs!r}")
    _check_batch_size(batch_size)
    if not isinstance(stage, str):
        raise TypeError(f"stage must be a str; got stage={stage!r}")


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    callback: Callable[[int, dict[str, float], TrainState], None] | None = None,
    stage: str = "training",
) -> FitResult:
    """Train ``model`` with ``tx`` on ``data.x_train`` and evaluate each epoch.

    Each epoch shuffles the training set with seed ``(seed, epoch)`` and runs
    the jitted, buffer-donating step on full batches (the remainder is
    dropped, so the step compiles once; a training set smaller than
    ``batch_size`` is one batch). ``model`` itself is not modified. This is
    :func:`init_train_state` followed by :func:`fit_state`.

    Args:
      model: an NNX module.
      tx: any optax transform.
      data: a :class:`jaxopt_nn.data.Dataset`.
      epochs: number of passes over the training set, ``>= 1``.
      batch_size: examples per step.
      seed: seed of the shuffling.
      progress: draw a progress bar with per-epoch loss/accuracy (stderr).
      loss_fn: see :func:`make_train_step`.
      param_transform: see :func:`make_train_step`; also used for evaluation.
      callback: ``callback(epoch, record, state)`` after every epoch; must not
        keep ``state`` past the call (its buffers are donated next epoch).
      stage: the name the progress bar shows (e.g. ``'dense'``, ``'pruning'``).

    Returns:
      :class:`FitResult` ``(graphdef, state, history)``; each history record
      holds ``epoch``, ``train_loss``, ``train_accuracy`` (means over the
      epoch's steps), ``test_loss``, ``test_accuracy`` (NaN for an empty
      test set) and ``seconds``.

    Raises:
      ValueError: if ``epochs`` or ``batch_size`` is not a positive int, or
        ``data`` has no training examples (without test examples the test
        metrics are NaN).
      TypeError: if ``stage`` is not a str.

    Example:
      >>> from jaxopt_nn.data import load_digits
      >>> from jaxopt_nn.models import LeNet300100
      >>> result = fit(LeNet300100(64, rngs=nnx.Rngs(0)), optax.adam(1e-3), load_digits(),
      ...              epochs=2, progress=False)
      >>> [sorted(r) for r in result.history][0]
      ['epoch', 'seconds', 'test_accuracy', 'test_loss', 'train_accuracy', 'train_loss']
    """
    _check_fit_args(epochs, batch_size, stage)
    graphdef, state = init_train_state(model, tx)
    return fit_state(
        graphdef,
        state,
        tx,
        data,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        loss_fn=loss_fn,
        param_transform=param_transform,
        callback=callback,
        stage=stage,
    )


def fit_state(
    graphdef: nnx.GraphDef,
    state: TrainState,
    tx: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    param_transform: ParamTransform | None = None,
    callback: Callable[[int, dict[str, float], TrainState], None] | None = None,
    stage: str = "training",
) -> FitResult:
    """:func:`fit` starting from a :class:`TrainState` instead of a model.

    For training that continues from an earlier state, or whose trainable
    ``state.params`` are not the model's parameters (e.g. shared-weight
    centroids that ``param_transform`` expands into them). ``state`` is
    consumed: its buffers are donated to the first step.

    Args:
      graphdef: from :func:`init_train_state`.
      state: the starting state; ``state.opt_state`` must belong to ``tx``.
      tx: the optax transform.
      data: a :class:`jaxopt_nn.data.Dataset`.
      epochs, batch_size, seed, progress, loss_fn, param_transform, callback, stage:
        as in :func:`fit`.

    Returns:
      :class:`FitResult`, as in :func:`fit`.

    Raises:
      ValueError: if ``epochs`` or ``batch_size`` is not a positive int, or
        ``data`` has no training examples (without test examples the test
        metrics are NaN).
    """
    _check_fit_args(epochs, batch_size, stage)
    n_train = len(data.x_train)
    if n_train == 0:
        raise ValueError("data must have training examples; got 0 in data.x_train")
    batch_size = min(batch_size, n_train)
    steps_per_epoch = n_train // batch_size
    step = make_train_step(graphdef, tx, loss_fn=loss_fn, param_transform=param_transform)
    eval_step = make_eval_step(graphdef, param_transform=param_transform)
    history: list[dict[str, float]] = []
    with _progress(progress, epochs * steps_per_epoch, stage) as advance:
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            metrics = []
            for xb, yb in batches(
                data.x_train, data.y_train, batch_size, seed=(seed, epoch), drop_remainder=True
            ):
                state, m = step(state, jnp.asarray(xb), jnp.asarray(yb))
                metrics.append(m)
                advance()
            train = _weighted_means(metrics, [batch_size] * len(metrics))
            test = _evaluate_with(eval_step, state, data.x_test, data.y_test, 1024)
            record = {
                "epoch": epoch,
                "train_loss": train["loss"],
                "train_accuracy": train["accuracy"],
                "test_loss": test["loss"],
                "test_accuracy": test["accuracy"],
                "seconds": time.perf_counter() - start,
            }
            history.append(record)
            advance(
                f"epoch {epoch}/{epochs}  loss {record['train_loss']:.4f}  "
                f"acc {record['train_accuracy']:.2%}  test acc {record['test_accuracy']:.2%}"
            )
            if callback is not None:
                callback(epoch, record, state)
    return FitResult(graphdef, state, history)
