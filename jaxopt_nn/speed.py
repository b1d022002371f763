"""FLOPs from XLA's cost analysis and measured latency, baseline in the same run.

A smaller model is only faster when a ratio measured in the same run says so.
:func:`count_flops` asks XLA for the floating-point operations of the
compiled function (a prediction); :func:`latency` times it, and
:func:`compare_latency` times a baseline and a candidate in alternating
rounds so that both see the same machine load, and reports the ratio.

Every helper accepts a plain function or an NNX module. A module is split
into its graph definition and state, and the call is jitted as a function of
the state (so the weights are arguments, not constants folded into the
program). It runs in its current mode: call ``model.eval()`` first to time
inference of a model with batch norm or dropout.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

__all__ = ["LatencyComparison", "compare_latency", "count_flops", "latency"]


class LatencyComparison(NamedTuple):
    """Median seconds per call of a baseline and a candidate measured together."""

    baseline: float  # median seconds per call of the baseline
    candidate: float  # median seconds per call of the candidate
    speedup: float  # median of the rounds' baseline / candidate (> 1: the candidate is faster)


def _check_callable(fn_or_model: Any) -> None:
    if not callable(fn_or_model):
        raise TypeError(
            f"fn_or_model must be a callable or an nnx.Module; got {type(fn_or_model).__name__}"
        )


def _jitted_with_state(
    fn_or_model: Callable[..., Any] | nnx.Module,
) -> tuple[Any, tuple[Any, ...]]:
    """A jitted function and the arguments that go before the call's own.

    A module's state is flattened once, here, and passed as the list of its
    arrays (the weights are arguments, not constants folded into the
    program), so the time of a call does not include flattening an
    ``nnx.State`` in Python (a fixed cost that would dilute every ratio).
    """
    if isinstance(fn_or_model, nnx.Module):
        graphdef, state = nnx.split(fn_or_model)
        leaves, treedef = jax.tree.flatten(state)

        def call(leaves: list[Any], *args: Any) -> Any:
            return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))(*args)

        return jax.jit(call), (leaves,)
    _check_callable(fn_or_model)
    return jax.jit(fn_or_model), ()


def _jitted(fn_or_model: Callable[..., Any] | nnx.Module) -> Callable[..., Any]:
    """A jitted callable of the call arguments (see :func:`_jitted_with_state`)."""
    jitted, state = _jitted_with_state(fn_or_model)
    return functools.partial(jitted, *state)


def count_flops(fn_or_model: Callable[..., Any] | nnx.Module, *args: Any) -> float:
    """Floating-point operations of one call, from XLA's cost analysis.

    The function (or module) is jitted, lowered for ``args`` and compiled; the
    count is the ``'flops'`` entry of ``Compiled.cost_analysis()`` (a dict in
    recent JAX, a list with one dict per program in older releases, summed).
    A multiply-add counts as two operations. It is the compiler's estimate
    for the compiled program, not a measurement.

    Args:
      fn_or_model: a function of ``args`` or an NNX module called on ``args``.
      *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
      The number of floating-point operations as a float.

    Raises:
      TypeError: if ``fn_or_model`` is not callable.
      ValueError: if the backend reports no cost analysis.

    Example:
      >>> import jax.numpy as jnp
      >>> count_flops(lambda a, b: a @ b, jnp.ones((4, 8)), jnp.ones((8, 3)))
      192.0
    """
    jitted, state = _jitted_with_state(fn_or_model)
    analysis = jitted.lower(*state, *args).compile().cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    if not analysis or any(not isinstance(a, dict) for a in analysis):
        raise ValueError(f"the backend reported no cost analysis; got {analysis!r}")
    return float(sum(a.get("flops", 0.0) for a in analysis))


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {name}={value!r}")


def _timed(call: Callable[..., Any], args: tuple, repeats: int) -> float:
    """Seconds per call of ``repeats`` calls made back to back, blocked on the last."""
    start = time.perf_counter()
    result = call(*args)
    for _ in range(repeats - 1):
        result = call(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - start) / repeats


def latency(
    fn_or_model: Callable[..., Any] | nnx.Module,
    *args: Any,
    repeats: int = 10,
    rounds: int = 5,
    warmup: int = 2,
) -> float:
    """Median wall-clock seconds per call of the jitted function.

    The function is jitted (a module as a function of its state, passed as
    its flat list of arrays) and called ``warmup`` times (compilation
    included). Each of ``rounds`` rounds then times ``repeats`` calls made
    back to back, waiting with ``jax.block_until_ready`` on the last one
    only, so the dispatch of a call overlaps the computation of the one
    before (the steady state of a serving loop, as ``timeit`` measures it).
    The result is the median over the rounds of the seconds per call (robust
    to the spikes of a busy machine).

    Args:
      fn_or_model: a function of ``args`` or an NNX module called on ``args``.
      *args: the arguments of each call.
      repeats: calls per round (>= 1).
      rounds: timed rounds (>= 1).
      warmup: untimed calls first (>= 1, the first one compiles).

    Returns:
      Median seconds per call.

    Raises:
      TypeError: if ``fn_or_model`` is not callable.
      ValueError: if a count is out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> latency(lambda x: x * 2, jnp.ones(8), repeats=2, rounds=2) > 0
      True
    """
    _check_count("repeats", repeats, 1)
    _check_count("rounds", rounds, 1)
    _check_count("warmup", warmup, 1)
    call = _jitted(fn_or_model)
    for _ in range(warmup):
        _timed(call, args, 1)
    return statistics.median(_timed(call, args, repeats) for _ in range(rounds))


def compare_latency(
    baseline: Callable[..., Any] | nnx.Module,
    candidate: Callable[..., Any] | nnx.Module,
    *args: Any,
    repeats: int | None = 10,
    rounds: int = 7,
    warmup: int = 2,
    round_seconds: float = 3e-3,
) -> LatencyComparison:
    r"""Latency of a baseline and a candidate measured in interleaved rounds.

    Both are jitted and warmed up as in :func:`latency`; then every round
    times ``repeats`` back-to-back calls of each on the same ``args``,
    alternating between the two (the order flips every round: baseline
    first, then candidate first) so that a slow phase of the machine hits
    both alike. Reported: the median over the rounds of the seconds per call
    of each, and as ``speedup`` the median over the rounds of the ratio

    .. math::

      s = \operatorname{median}_r \; t^{\mathrm{baseline}}_r / t^{\mathrm{candidate}}_r

    of the two times of a round, measured next to each other: a burst of load
    from other processes that slows one round of both cancels in its ratio,
    where it would shift the two medians by different amounts.

    Args:
      baseline: the reference function or NNX module.
      candidate: the function or module to compare against it.
      *args: the arguments of each call, shared by both.
      repeats: calls per round (>= 1), or ``None``: sized for each callable
        after its warm-up, from the time of one call, so that a round takes
        about ``round_seconds`` (a fast layer and a slow model then get
        rounds of the same length, long enough to time and short enough
        that load from other processes rarely falls into only one of two).
      rounds: timed rounds of each callable (>= 1).
      warmup: untimed calls of each first (>= 1, the first one compiles).
      round_seconds: target seconds per round when ``repeats`` is ``None`` (> 0).

    Returns:
      A :class:`LatencyComparison` ``(baseline, candidate, speedup)``.

    Raises:
      TypeError: if either is not callable.
      ValueError: if a count or ``round_seconds`` is out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((64, 64))
      >>> result = compare_latency(lambda x: x @ x @ x, lambda x: x @ x, x, rounds=3)
      >>> result.speedup > 0
      True
    """
    if repeats is not None:
        _check_count("repeats", repeats, 1)
    _check_count("rounds", rounds, 1)
    _check_count("warmup", warmup, 1)
    if (
        isinstance(round_seconds, bool)
        or not isinstance(round_seconds, (int, float))
        or not 0 < round_seconds < math.inf
    ):
        raise ValueError(
            f"round_seconds must be a finite number > 0; got round_seconds={round_seconds!r}"
        )
    calls = (_jitted(baseline), _jitted(candidate))
    counts = []
    for call in calls:
        seconds = 0.0
        for _ in range(warmup):  # the last warm-up call sizes the rounds
            seconds = _timed(call, args, 1)
        counts.append(repeats or max(1, int(round_seconds / max(seconds, 1e-7))))
    times: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds):
        for i in (0, 1) if round_ % 2 == 0 else (1, 0):
            times[i].append(_timed(calls[i], args, counts[i]))
    ratio = statistics.median(b / c for b, c in zip(*times, strict=True))
    return LatencyComparison(statistics.median(times[0]), statistics.median(times[1]), ratio)
