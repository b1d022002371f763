r"""Adam and RMSprop as optax gradient transformations, with optional 8-bit or 4-bit state.

The float path follows optax 0.2.8 operation for operation (so results agree
to float32 rounding, complex parameters included), and the states are optax's
own ``NamedTuple`` s, so a state saved from optax loads into ours and back.
``state_quantization=BlockQuantization(...)`` stores the moments of large
tensors block-wise in 8 bits (Dettmers et al. 2021) or 4 bits (Li et al.
2023) plus one float32 scale per block, decoded and encoded inside the
update.

Building blocks ``scale_by_adam``, ``scale_by_rms`` and ``scale_by_stddev``
return :class:`optax.GradientTransformationExtraArgs`; the aliases ``adam``,
``adamw``, ``nadam``, ``nadamw`` and ``rmsprop`` chain them with
:func:`optax.scale_by_learning_rate` (and :func:`optax.add_decayed_weights`,
:func:`optax.trace`), exactly as optax does, so every optax wrapper
(``chain``, ``inject_hyperparams``, ``masked``, ``MultiSteps``) and
``nnx.Optimizer`` compose with them.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_nn._blockwise import (
    BlockQuantization,
    BlockQuantizedArray,
    Code,
    block_maxima,
    dequantize,
    filled,
    fused_step,
    quantize,
    stored_absmax,
    uses_kernel,
    with_xla_derivative,
)

__all__ = [
    "BlockQuantization",
    "BlockQuantizedArray",
    "ScaleByAdamState",
    "ScaleByRStdDevState",
    "ScaleByRStdDevWithCountState",
    "ScaleByRmsState",
    "ScaleByRmsWithCountState",
    "adam",
    "adamw",
    "nadam",
    "nadamw",
    "rmsprop",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_stddev",
]

EightBit = bool | BlockQuantization

# optax's states (a quantized moment is a BlockQuantizedArray in the params'
# tree). optax 0.2.8 does not export the with-count variants: the classes
# below have their names and fields, in their order.
ScaleByAdamState = optax.ScaleByAdamState
ScaleByRmsState = optax.ScaleByRmsState
ScaleByRStdDevState = optax.ScaleByRStdDevState


class ScaleByRmsWithCountState(NamedTuple):
    """State of :func:`scale_by_rms` with ``bias_correction`` (optax's fields)."""

    count: jax.Array  # int32, shape (); steps taken, saturates at 2**31 - 1
    nu: optax.Updates  # tree of params: param dtype, or BlockQuantizedArray


class ScaleByRStdDevWithCountState(NamedTuple):
    """State of :func:`scale_by_stddev` with ``bias_correction`` (optax's fields)."""

    count: jax.Array  # int32, shape (); steps taken, saturates at 2**31 - 1
    mu: optax.Updates  # tree of params, param dtype
    nu: optax.Updates  # tree of params, param dtype


# ---------------------------------------------------------------------------
# Argument checks (plain Python numbers only: inject_hyperparams passes arrays).


def _is_plain_number(value: object) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _check_unit_interval(name: str, value: object) -> None:
    if _is_plain_number(value) and not 0.0 <= value < 1.0:  # type: ignore[operator]
        raise ValueError(f"{name} must lie in [0, 1); got {name}={value!r}")


def _check_non_negative(name: str, value: object) -> None:
    if _is_plain_number(value) and not value >= 0.0:  # type: ignore[operator]
        raise ValueError(f"{name} must be >= 0; got {name}={value!r}")


def _check_scalar_or_schedule(name: str, value: object) -> None:
    if not (
        callable(value) or _is_plain_number(value) or isinstance(value, (jax.Array, np.ndarray))
    ):
        raise ValueError(
            f"{name} must be a number or a schedule (a callable step -> value); "
            f"got {name}={value!r}"
        )


def _quantization(
    state_quantization: BlockQuantization | None, eight_bit: EightBit
) -> BlockQuantization | None:
    """The quantization settings from ``state_quantization`` or its alias ``eight_bit``."""
    if state_quantization is not None:
        if eight_bit is not False:
            raise ValueError(
                "give state_quantization or its alias eight_bit, not both; got "
                f"state_quantization={state_quantization!r}, eight_bit={eight_bit!r}"
            )
        if not isinstance(state_quantization, BlockQuantization):
            raise TypeError(
                "state_quantization must be a BlockQuantization or None; "
                f"got state_quantization={state_quantization!r}"
            )
        return state_quantization
    if isinstance(eight_bit, BlockQuantization):
        return eight_bit
    if isinstance(eight_bit, (bool, np.bool_)):
        return BlockQuantization() if eight_bit else None
    raise TypeError(f"eight_bit must be a bool or a BlockQuantization; got eight_bit={eight_bit!r}")


def _canonical_dtype(mu_dtype: Any) -> Any:
    if mu_dtype is None:
        return None
    dtype = jax.dtypes.canonicalize_dtype(mu_dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f"mu_dtype must be a floating or complex dtype or None; got mu_dtype={mu_dtype!r}"
        )
    return dtype


# ---------------------------------------------------------------------------
# Moments: tree maps that skip ``None`` updates, and the (maybe quantized) storage.


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _unwrap(x: Any) -> Any:
    """The array in ``x``: an ``nnx.Variable``'s value; a quantized moment's arrays."""
    if isinstance(x, BlockQuantizedArray):
        return BlockQuantizedArray(*(_unwrap(a) for a in x))
    return x.get_value() if _is_variable(x) else x


def _wrap_like(variable: nnx.Variable, x: Any) -> Any:
    """``x`` in a copy of ``variable`` (each array of a quantized moment in its own)."""
    if isinstance(x, BlockQuantizedArray):
        return BlockQuantizedArray(*(_wrap_like(variable, a) for a in x))
    return jax.tree.map(lambda _: x, variable)


def _map_many(
    fn: Callable[..., tuple[Any, ...]], outputs: int, updates: optax.Updates, *rest: Any
) -> tuple[Any, ...]:
    """``outputs`` trees from ``fn``, which maps a leaf of ``updates`` (and ``rest``) to a tuple.

    ``None`` leaves of ``updates`` stay ``None`` in every output. Subtrees of
    ``rest`` at a leaf of ``updates`` (a :class:`BlockQuantizedArray`) reach
    ``fn`` whole. Trees of ``nnx.Variable`` s (``nnx.State``) reach ``fn`` as
    arrays and each result is wrapped like the update's variable.
    """
    treedef = jax.tree.structure(updates, is_leaf=lambda x: x is None or _is_variable(x))

    def apply(g: Any, *xs: Any) -> tuple[Any, ...]:
        if g is None:
            return (None,) * outputs
        if _is_variable(g):
            return tuple(_wrap_like(g, y) for y in fn(_unwrap(g), *map(_unwrap, xs)))
        return fn(g, *xs)

    columns = [treedef.flatten_up_to(t) for t in (updates, *rest)]
    rows = [apply(*row) for row in zip(*columns, strict=True)]
    return tuple(treedef.unflatten([row[i] for row in rows]) for i in range(outputs))


def _map(fn: Callable[..., Any], updates: optax.Updates, *rest: Any) -> Any:
    """``fn`` over the leaves of ``updates`` and ``rest`` (see :func:`_map_many`), one tree."""
    return _map_many(lambda *xs: (fn(*xs),), 1, updates, *rest)[0]


def _abs_sq(x: jax.Array) -> jax.Array:
    """``|x|**2``: ``x * conj(x)``, real, for complex ``x``; ``x**2`` otherwise (optax's HLO)."""
    if jnp.iscomplexobj(x):
        return (x.conj() * x).real
    return x**2


def _init_moment(
    params: optax.Params,
    fill: Any,
    dtype: Any,
    quantization: BlockQuantization | None,
    code: Code,
) -> optax.Updates:
    """A moment per leaf of ``params``: ``fill`` in ``dtype``, or quantized.

    A leaf inside a wrapper with one array (an ``nnx.Variable``) gets a
    quantized moment whose codes and scales are each wrapped like it, so
    ``nnx.Optimizer`` keeps the same tree type after every update.
    """

    def init(node: Any) -> Any:
        leaves = jax.tree.leaves(node)
        if quantization is None or len(leaves) != 1 or not quantization.applies_to(leaves[0]):
            if quantization is not None and leaves and jnp.iscomplexobj(leaves[0]):
                if np.size(leaves[0]) >= max(quantization.min_size, 1):
                    raise TypeError(
                        "state_quantization stores real moments only; got a complex "
                        f"{jnp.result_type(leaves[0])} leaf of shape {np.shape(leaves[0])} "
                        "(keep it in floating point: min_size above its size, or "
                        "optax.partition)"
                    )
            return jax.tree.map(lambda p: jnp.full_like(p, fill, dtype=dtype), node)
        q = filled(leaves[0], fill, code, quantization)
        return _wrap_like(node, q) if _is_variable(node) else q

    return jax.tree.map(init, params, is_leaf=_is_variable)


def _load(stored: Any, g: jax.Array, code: Code, quantization: BlockQuantization | None) -> Any:
    """The moment as an array: quantized moments are decoded to the gradient's dtype."""
    if not isinstance(stored, BlockQuantizedArray):
        return stored
    assert quantization is not None
    return dequantize(stored, code, np.shape(g), quantization).astype(jnp.result_type(g))


def _bounds(
    g: jax.Array,
    stored: list[BlockQuantizedArray],
    decays: list[Any],
    codes: list[Code],
    quantization: BlockQuantization,
) -> list[jax.Array] | None:
    """Upper bounds of the new moments' block maxima (of the root for 'sqrt'), or None.

    From the stored maxima ``M`` and the gradient's block maxima ``G``:
    ``|m'| <= decay * M + (1 - decay) * G`` and ``sqrt(v') <= sqrt(decay * M**2
    + (1 - decay) * G**2)``, so the block scales need one reduction over the
    gradient only, not over the decoded moments. The 8-bit codes lose no
    relative precision to a loose scale (their range is ``2**15``); 4-bit
    codes, with only 8 (first moment) or 128 (root) between their smallest
    and largest magnitude, take the exact maxima of the new moments (``None``).
    """
    if quantization.bits == 4:
        return None
    (grad,) = block_maxima([g], ["signed"], quantization)
    bounds = []
    for q, decay, code in zip(stored, decays, codes, strict=True):
        peak = stored_absmax(q, code, quantization)
        if code == "signed":
            bounds.append(decay * peak + (1 - decay) * grad)
        else:
            bounds.append(jnp.sqrt(decay * peak * peak + (1 - decay) * grad * grad))
    return bounds


def _store_leaf(
    g: jax.Array,
    values: tuple[jax.Array, ...],
    stored: tuple[Any, ...],
    decays: tuple[Any, ...],
    codes: tuple[Code, ...],
    quantization: BlockQuantization | None,
) -> tuple[Any, ...]:
    """One leaf's new moments ``values`` in the storage formats of ``stored``.

    The quantized ones share one reduction for their block scales: over the
    gradient for 8-bit bounds (:func:`_bounds`), over the new moments for
    4-bit exact maxima (computed from the decoded old moments and the
    gradient inside the reduction, never written out).
    """
    quantized = [i for i, s in enumerate(stored) if isinstance(s, BlockQuantizedArray)]
    out: list[Any] = [
        v.astype(s.dtype) if i not in quantized else None
        for i, (v, s) in enumerate(zip(values, stored, strict=True))
    ]
    if quantized:
        assert quantization is not None
        pick: list[Code] = [codes[i] for i in quantized]
        moments = [values[i] for i in quantized]
        absmax = _bounds(
            g, [stored[i] for i in quantized], [decays[i] for i in quantized], pick, quantization
        )
        if absmax is None:
            absmax = block_maxima(moments, pick, quantization)
        for i, v, code, bound in zip(quantized, moments, pick, absmax, strict=True):
            out[i] = quantize(v, code, quantization, bound)
    return tuple(out)


def _store(
    updates: optax.Updates,
    values: tuple[optax.Updates, ...],
    stored: tuple[optax.Updates, ...],
    decays: tuple[Any, ...],
    codes: tuple[Code, ...],
    quantization: BlockQuantization | None,
) -> tuple[optax.Updates, ...]:
    """The new moments ``values`` (trees) in the storage formats of ``stored``.

    ``decays`` and ``codes`` are the moments' EMA decays and codes.
    """
    k = len(values)
    return _map_many(
        lambda g, *xs: _store_leaf(g, xs[:k], xs[k:], decays, codes, quantization),
        k,
        updates,
        *values,
        *stored,
    )


def _ema_leaf(
    g: jax.Array, stored: Any, decay: Any, order: int, code: Code, quantization: Any
) -> jax.Array:
    """``(1 - decay) * g**order + decay * moment`` with ``|g|**2`` for order 2 (optax's)."""
    return (1 - decay) * (_abs_sq(g) if order == 2 else g**order) + decay * _load(
        stored, g, code, quantization
    )


def _ema(
    updates: optax.Updates,
    stored: optax.Updates,
    decay: Any,
    order: int,
    code: Code,
    quantization: BlockQuantization | None,
) -> optax.Updates:
    """:func:`_ema_leaf` over the leaves of ``updates``."""
    return _map(lambda g, s: _ema_leaf(g, s, decay, order, code, quantization), updates, stored)


def _correction(decay: Any, count: jax.typing.ArrayLike) -> jax.Array:
    """``1 - decay**count``, the bias correction of a moment (float32)."""
    return jnp.asarray(1 - decay**count)


def _bias_correction(
    moment: optax.Updates, decay: Any, count: jax.typing.ArrayLike
) -> optax.Updates:
    """``moment / (1 - decay**count)``, the correction computed in float32."""
    correction = _correction(decay, count)
    return _map(lambda t: t / correction.astype(t.dtype), moment)


def _hyperparameters(*values: Any) -> jax.Array:
    """The fused kernel's float32 hyperparameter vector (numbers or traced scalars)."""
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def _fused(quantization: BlockQuantization | None, g: Any, *stored: Any) -> bool:
    """Whether a leaf's step runs in the fused CPU kernel (all its moments quantized)."""
    return (
        quantization is not None
        and all(isinstance(s, BlockQuantizedArray) for s in stored)
        and uses_kernel(quantization, g)
    )


# ---------------------------------------------------------------------------
# Building blocks.


def scale_by_adam(
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    state_quantization: BlockQuantization | None = None,
    eight_bit: EightBit = False,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by Adam's bias-corrected moments (see :func:`adam`).

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added to the second moment inside the square root, >= 0.
      mu_dtype: dtype of the first moment (``None``: the params' dtype); with
        ``state_quantization`` it applies to the leaves kept in floating point.
      nesterov: use Nesterov momentum (NAdam, Dozat 2016).
      state_quantization: a :class:`BlockQuantization` stores both moments
        of large tensors block-wise in 8 or 4 bits (see :func:`adam`).
      eight_bit: alias of ``state_quantization``: ``True`` means
        ``BlockQuantization()`` (8 bits).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with state
      :class:`ScaleByAdamState`.

    Raises:
      ValueError: if ``b1`` or ``b2`` is outside [0, 1), ``eps`` or
        ``eps_root`` is negative, ``mu_dtype`` is neither floating nor
        complex, or both ``state_quantization`` and ``eight_bit`` are given.
      TypeError: if ``state_quantization`` or ``eight_bit`` has the wrong
        type; from ``init``, if a complex leaf would be quantized.
    """
    _check_unit_interval("b1", b1)
    _check_unit_interval("b2", b2)
    _check_non_negative("eps", eps)
    _check_non_negative("eps_root", eps_root)
    mu_dtype = _canonical_dtype(mu_dtype)
    quantization = _quantization(state_quantization, eight_bit)

    def init_fn(params: optax.Params) -> ScaleByAdamState:
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=_init_moment(params, 0.0, mu_dtype, quantization, "signed"),
            nu=_init_moment(params, 0.0, None, quantization, "sqrt"),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByAdamState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByAdamState]:
        del params, extra_args
        count: jax.Array = optax.safe_increment(state.count)  # pyright: ignore[reportAssignmentType]
        c1, c2 = _correction(b1, count), _correction(b2, count)
        c1_next = _correction(b1, optax.safe_increment(count)) if nesterov else c1

        # Arguments of each leaf's step, not closed over, so that the
        # kernel's step is differentiated as the XLA path's.
        hyper = (b1, b2, eps, eps_root, c1, c2, c1_next)

        def xla_leaf(
            g: jax.Array, stored_m: Any, stored_v: Any, *hyper: Any
        ) -> tuple[Any, Any, Any]:
            b1, b2, eps, eps_root, c1, c2, c1_next = hyper
            m = _ema_leaf(g, stored_m, b1, 1, "signed", quantization)
            v = _ema_leaf(g, stored_v, b2, 2, "sqrt", quantization)
            if nesterov:
                m_hat = b1 * (m / c1_next.astype(m.dtype)) + (1 - b1) * (g / c1.astype(g.dtype))
            else:
                m_hat = m / c1.astype(m.dtype)
            v_hat = v / c2.astype(v.dtype)
            stored = _store_leaf(
                g, (m, v), (stored_m, stored_v), (b1, b2), ("signed", "sqrt"), quantization
            )
            return m_hat / (jnp.sqrt(v_hat + eps_root) + eps), *stored

        def kernel_leaf(
            g: jax.Array, stored_m: Any, stored_v: Any, *hyper: Any
        ) -> tuple[Any, Any, Any]:
            assert quantization is not None
            b1, b2, eps, eps_root, c1, c2, c1_next = hyper
            vector = _hyperparameters(b1, 1 - b1, b2, 1 - b2, c1, c2, c1_next, eps, eps_root)
            mode = "nadam" if nesterov else "adam"
            u, (m, v) = fused_step(g, [stored_m, stored_v], vector, quantization, mode)
            return u, m, v

        def leaf(g: jax.Array, stored_m: Any, stored_v: Any) -> tuple[Any, Any, Any]:
            if _fused(quantization, g, stored_m, stored_v):
                step = with_xla_derivative(kernel_leaf, xla_leaf)
                return step(g, stored_m, stored_v, *hyper)
            return xla_leaf(g, stored_m, stored_v, *hyper)

        new_updates, mu, nu = _map_many(leaf, 3, updates, state.mu, state.nu)
        return new_updates, ScaleByAdamState(count=count, mu=mu, nu=nu)

    # update_fn takes this transform's own state type, narrower than optax.OptState.
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def _rms_scaling(eps: Any, eps_in_sqrt: bool) -> Callable[[jax.Array], jax.Array]:
    if eps_in_sqrt:
        return lambda v: jax.lax.rsqrt(v + eps)
    return lambda v: 1 / (jnp.sqrt(v) + eps)


def scale_by_rms(
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    initial_scale: float | jax.Array = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    state_quantization: BlockQuantization | None = None,
    eight_bit: EightBit = False,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by the root of the mean square of gradients (see :func:`rmsprop`).

    Args:
      decay: decay of the second moment, in [0, 1).
      eps: stabiliser of the denominator, >= 0.
      initial_scale: initial second moment, >= 0.
      eps_in_sqrt: add ``eps`` inside the square root (optax) or outside
        (PyTorch).
      bias_correction: divide the second moment by ``1 - decay**t``.
      state_quantization: a :class:`BlockQuantization` stores the second
        moment of large tensors block-wise in 8 or 4 bits.
      eight_bit: alias of ``state_quantization`` (``True``: 8 bits).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with optax's state:
      :class:`ScaleByRmsState` (``nu``), or :class:`ScaleByRmsWithCountState`
      (``count, nu``) with ``bias_correction``.

    Raises:
      ValueError: if ``decay`` is outside [0, 1), ``eps``/``initial_scale``
        is negative, or both ``state_quantization`` and ``eight_bit`` are
        given.
      TypeError: if ``state_quantization`` or ``eight_bit`` has the wrong
        type; from ``init``, if a complex leaf would be quantized.
    """
    _check_unit_interval("decay", decay)
    _check_non_negative("eps", eps)
    _check_non_negative("initial_scale", initial_scale)
    quantization = _quantization(state_quantization, eight_bit)

    def init_fn(params: optax.Params) -> ScaleByRmsState | ScaleByRmsWithCountState:
        nu = _init_moment(params, initial_scale, None, quantization, "sqrt")
        if bias_correction:
            return ScaleByRmsWithCountState(count=jnp.zeros([], jnp.int32), nu=nu)
        return ScaleByRmsState(nu=nu)

    def update_fn(
        updates: optax.Updates,
        state: ScaleByRmsState | ScaleByRmsWithCountState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByRmsState | ScaleByRmsWithCountState]:
        del params, extra_args
        counted = isinstance(state, ScaleByRmsWithCountState)
        count: Any = optax.safe_increment(state.count) if counted else None
        correction = _correction(decay, count) if count is not None else None

        # Arguments of each leaf's step, not closed over (see scale_by_adam).
        hyper = (decay, eps, 1.0 if correction is None else correction)

        def xla_leaf(g: jax.Array, stored: Any, *hyper: Any) -> tuple[Any, Any]:
            decay, eps, correction = hyper
            v = _ema_leaf(g, stored, decay, 2, "sqrt", quantization)
            (new,) = _store_leaf(g, (v,), (stored,), (decay,), ("sqrt",), quantization)
            if count is not None:
                v = v / correction.astype(v.dtype)
            return _rms_scaling(eps, eps_in_sqrt)(v) * g, new

        def kernel_leaf(g: jax.Array, stored: Any, *hyper: Any) -> tuple[Any, Any]:
            assert quantization is not None
            decay, eps, correction = hyper
            vector = _hyperparameters(decay, 1 - decay, correction, eps)
            mode = "rms_eps_in_sqrt" if eps_in_sqrt else "rms_eps_outside"
            u, (v,) = fused_step(g, [stored], vector, quantization, mode)
            return u, v

        def leaf(g: jax.Array, stored: Any) -> tuple[Any, Any]:
            if _fused(quantization, g, stored):
                return with_xla_derivative(kernel_leaf, xla_leaf)(g, stored, *hyper)
            return xla_leaf(g, stored, *hyper)

        new_updates, nu = _map_many(leaf, 2, updates, state.nu)
        if count is not None:
            return new_updates, ScaleByRmsWithCountState(count=count, nu=nu)
        return new_updates, ScaleByRmsState(nu=nu)

    # update_fn takes this transform's own state type, narrower than optax.OptState.
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


def scale_by_stddev(
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    initial_scale: float | jax.Array = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Rescale updates by the root of the centered mean square (see :func:`rmsprop`).

    The state stays in floating point: the variance ``nu - |mu|**2`` of two
    quantized moments could turn negative.

    Args:
      decay: decay of both moments, in [0, 1).
      eps: stabiliser of the denominator, >= 0.
      initial_scale: initial second moment, >= 0.
      eps_in_sqrt: add ``eps`` inside the square root (optax) or outside
        (PyTorch).
      bias_correction: divide both moments by ``1 - decay**t``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` with optax's state:
      :class:`ScaleByRStdDevState` (``mu, nu``), or
      :class:`ScaleByRStdDevWithCountState` (``count, mu, nu``) with
      ``bias_correction``.

    Raises:
      ValueError: if ``decay`` is outside [0, 1) or ``eps``/``initial_scale``
        is negative.
    """
    _check_unit_interval("decay", decay)
    _check_non_negative("eps", eps)
    _check_non_negative("initial_scale", initial_scale)
    scaling = _rms_scaling(eps, eps_in_sqrt)

    def init_fn(params: optax.Params) -> ScaleByRStdDevState | ScaleByRStdDevWithCountState:
        mu = _init_moment(params, 0.0, None, None, "signed")
        nu = _init_moment(params, initial_scale, None, None, "sqrt")
        if bias_correction:
            return ScaleByRStdDevWithCountState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)
        return ScaleByRStdDevState(mu=mu, nu=nu)

    def update_fn(
        updates: optax.Updates,
        state: ScaleByRStdDevState | ScaleByRStdDevWithCountState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByRStdDevState | ScaleByRStdDevWithCountState]:
        del params, extra_args
        mu = _ema(updates, state.mu, decay, 1, "signed", None)
        nu = _ema(updates, state.nu, decay, 2, "sqrt", None)
        stored_mu, stored_nu = _store(
            updates, (mu, nu), (state.mu, state.nu), (decay, decay), ("signed", "sqrt"), None
        )
        if isinstance(state, ScaleByRStdDevWithCountState):
            count: jax.Array = optax.safe_increment(state.count)  # pyright: ignore[reportAssignmentType]
            mu, nu = _bias_correction(mu, decay, count), _bias_correction(nu, decay, count)
            new_state: Any = ScaleByRStdDevWithCountState(count=count, mu=stored_mu, nu=stored_nu)
        else:
            new_state = ScaleByRStdDevState(mu=stored_mu, nu=stored_nu)
        new_updates = _map(lambda g, m, v: scaling(v - _abs_sq(m)) * g, updates, mu, nu)
        return new_updates, new_state

    # update_fn takes this transform's own state type, narrower than optax.OptState.
    return optax.GradientTransformationExtraArgs(init_fn, update_fn)  # pyright: ignore[reportArgumentType]


# ---------------------------------------------------------------------------
# Optimizers.


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    state_quantization: BlockQuantization | None = None,
    eight_bit: EightBit = False,
) -> optax.GradientTransformationExtraArgs:
    r"""The Adam optimizer (Kingma & Ba 2014, Algorithm 1), optionally with 8-bit state.

    With learning rate :math:`\alpha_t`, ``b1``, ``b2``, ``eps``, ``eps_root``
    written :math:`\beta_1, \beta_2, \varepsilon, \bar\varepsilon` and
    :math:`m_0 = v_0 = 0`, step :math:`t \ge 1` with gradient :math:`g_t` is

    .. math::

      \begin{align*}
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \\
        \hat m_t &= m_t / (1 - \beta_1^t), \qquad
        \hat v_t = v_t / (1 - \beta_2^t), \\
        u_t &= -\alpha_t \, \hat m_t / \left(\sqrt{\hat v_t + \bar\varepsilon}
        + \varepsilon\right).
      \end{align*}

    ``nesterov=True`` replaces :math:`\hat m_t` by
    :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`
    (NAdam, also :func:`nadam`). For complex parameters :math:`g_t^2` is
    :math:`|g_t|^2 = g_t \bar g_t`. In floating point the result equals
    ``optax.adam`` with the same arguments.

    **Quantized state.** ``state_quantization=BlockQuantization(bits=8)``
    (alias ``eight_bit=True``) stores :math:`m` and :math:`v` of every real
    floating tensor with at least ``min_size`` (4096) elements as one byte per
    element plus one float32 scale per block of ``block_size`` (256) elements
    along the last axis: :math:`m` with a signed 8-bit float code (4 exponent,
    3 mantissa bits), :math:`\sqrt{v}` with an unsigned one (4 exponent, 4
    mantissa bits), each scaled by a bound of the block's absolute maximum
    (``b * M + (1 - b) * G`` from the stored maximum ``M`` and the gradient's
    block maximum ``G``; a loose scale costs these codes no relative
    precision): about 2.03 bytes per element instead of 8 (0.254x).
    ``BlockQuantization(bits=4)`` packs two codes per byte, blocks of 128 (Li
    et al. 2023): :math:`m` with (2, 1) bits, :math:`\sqrt{v}` with (3, 1)
    bits and no zero code, each scaled by the block's exact maximum (both
    moments' maxima in one reduction), about 1.06 bytes per element
    (0.133x). The moments are decoded, updated as above, and encoded again
    inside the update; the update uses the unrounded new moments. On a
    one-device CPU this runs in one fused pass per block of a C++ kernel
    (``BlockQuantization(kernel='auto')``, compiled on first use; same codes
    as the XLA path, about float32 Adam's speed); ``kernel='xla'`` keeps
    the jax.numpy path. Smaller tensors keep floating-point moments; complex
    tensors large enough to be quantized raise ``TypeError`` in ``init``.

    Args:
      learning_rate: a number or a schedule ``step -> learning rate``.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0 (for meta-gradients).
      mu_dtype: dtype of the first moment (``None``: the params' dtype), may
        be complex; with ``state_quantization`` it applies to the leaves kept
        in floating point.
      nesterov: use Nesterov momentum (NAdam).
      state_quantization: ``None`` (floating-point state) or a
        :class:`BlockQuantization` (8- or 4-bit block-wise state).
      eight_bit: alias of ``state_quantization``: ``True`` means
        ``BlockQuantization()`` (8 bits).

    Returns:
      ``optax.chain(scale_by_adam(...), optax.scale_by_learning_rate(learning_rate))``.

    Raises:
      ValueError: if ``b1``/``b2`` lie outside [0, 1), ``eps``/``eps_root`` are
        negative, ``learning_rate`` is neither a number nor a callable,
        ``mu_dtype`` is neither floating nor complex, or both
        ``state_quantization`` and ``eight_bit`` are given.
      TypeError: if ``state_quantization`` is not a BlockQuantization or
        ``eight_bit`` neither a bool nor a BlockQuantization.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from jaxopt_nn import optim
      >>> params = {'w': jnp.array([1.0, -2.0, 3.0])}
      >>> grads = {'w': jnp.array([0.5, -0.5, 2.0])}
      >>> tx = optim.adam(0.1)
      >>> updates, state = tx.update(grads, tx.init(params))
      >>> [round(float(u), 4) for u in updates['w']]
      [-0.1, 0.1, -0.1]
      >>> reference, _ = optax.adam(0.1).update(grads, optax.adam(0.1).init(params))
      >>> bool(jnp.array_equal(updates['w'], reference['w']))
      True

    References:
      Kingma, Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (Algorithm 1).

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.

      Dettmers, Lewis, Shleifer, Zettlemoyer, `8-bit Optimizers via Block-wise
      Quantization <https://arxiv.org/abs/2110.02861>`_, 2021.

      Li, Chen, Zhu, `Memory Efficient Optimizers with 4-bit States
      <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023.

    .. warning::
      Like optax and PyTorch this follows Algorithm 1 of Kingma & Ba, not the
      formulation before Section 2.1 that TensorFlow uses.
    """
    _check_scalar_or_schedule("learning_rate", learning_rate)
    return optax.chain(
        scale_by_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            state_quantization=state_quantization,
            eight_bit=eight_bit,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | jax.Array = 0.9,
    b2: float | jax.Array = 0.999,
    eps: float | jax.Array = 1e-8,
    eps_root: float | jax.Array = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    state_quantization: BlockQuantization | None = None,
    eight_bit: EightBit = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam with decoupled weight decay (Loshchilov & Hutter 2019).

    As :func:`adam`, with the update

    .. math::

      u_t = -\alpha_t \left( \hat m_t / \left(\sqrt{\hat v_t + \bar\varepsilon}
      + \varepsilon\right) + \lambda \theta_t \right),

    where :math:`\lambda` is ``weight_decay`` and :math:`\theta_t` the
    params. Like optax and PyTorch, the decay is multiplied by the learning
    rate. In floating point the result equals ``optax.adamw``.

    Args:
      learning_rate: a number or a schedule ``step -> learning rate``.
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: dtype of the first moment (``None``: the params' dtype).
      weight_decay: :math:`\lambda`, a number or a schedule.
      mask: which leaves decay: a pytree of bools with the structure of (a
        prefix of) the params, or a callable ``params -> such a pytree``;
        ``None`` decays every leaf. Adam itself applies to every leaf.
      nesterov: use Nesterov momentum (NAdamW, also :func:`nadamw`).
      state_quantization: block-wise quantized moments, as in :func:`adam`.
      eight_bit: alias of ``state_quantization`` (``True``: 8 bits).

    Returns:
      ``optax.chain(scale_by_adam(...), optax.add_decayed_weights(weight_decay,
      mask), optax.scale_by_learning_rate(learning_rate))``; the update needs
      ``params``.

    Raises:
      ValueError: as :func:`adam`, or if ``weight_decay`` is neither a number
        nor a callable.
      TypeError: as :func:`adam`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt_nn import optim
      >>> params = {'w': jnp.array([1.0, -2.0]), 'b': jnp.array([1.0, 1.0])}
      >>> grads = {'w': jnp.array([0.5, -0.5]), 'b': jnp.array([1.0, -1.0])}
      >>> tx = optim.adamw(0.1, weight_decay=0.5, mask={'w': True, 'b': False})
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> {k: [round(float(u), 4) for u in v] for k, v in updates.items()}
      {'b': [-0.1, 0.1], 'w': [-0.15, 0.2]}

    References:
      Loshchilov, Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.

      Kingma, Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    _check_scalar_or_schedule("learning_rate", learning_rate)
    _check_scalar_or_schedule("weight_decay", weight_decay)
    return optax.chain(
        scale_by_adam(
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            nesterov=nesterov,
            state_quantization=state_quantization,
            eight_bit=eight_bit,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def rmsprop(
    learning_rate: optax.ScalarOrSchedule,
    decay: float | jax.Array = 0.9,
    eps: float | jax.Array = 1e-8,
    initial_scale: float | jax.Array = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | jax.Array | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    state_quantization: BlockQuantization | None = None,
    eight_bit: EightBit = False,
) -> optax.GradientTransformationExtraArgs:
    r"""RMSprop (Hinton 2012), optionally centered (Graves 2013), with momentum.

    With decay :math:`\rho`, :math:`v_0 = ` ``initial_scale`` and
    :math:`m_0 = 0`:

    .. math::

      \begin{align*}
        v_t &= \rho v_{t-1} + (1 - \rho) g_t^2, \qquad
        m_t = \rho m_{t-1} + (1 - \rho) g_t \quad \text{(centered only)}, \\
        s_t &= v_t \;\text{or}\; v_t - m_t^2 \;\text{(centered)}, \qquad
        u_t = -\alpha_t \, g_t / \sqrt{s_t + \varepsilon}
        \;\text{or}\; -\alpha_t \, g_t / (\sqrt{s_t} + \varepsilon),
      \end{align*}

    the second form with ``eps_in_sqrt=False`` (PyTorch's). With
    ``bias_correction`` the moments are divided by :math:`1 - \rho^t`; for
    complex parameters :math:`g_t^2` is :math:`|g_t|^2` and :math:`m_t^2` is
    :math:`|m_t|^2`. The state is optax's (``ScaleByRmsState`` holds only
    :math:`v`; a ``count`` is kept only with ``bias_correction``). With
    ``momentum`` :math:`\mu`, the updates pass through
    ``optax.trace(decay=momentum, nesterov=nesterov)`` after the learning
    rate. In floating point the result equals ``optax.rmsprop``.

    Args:
      learning_rate: a number or a schedule ``step -> learning rate``.
      decay: :math:`\rho`, in [0, 1).
      eps: stabiliser of the denominator, >= 0.
      initial_scale: :math:`v_0`, >= 0 (PyTorch uses 0, TF1 uses 1).
      eps_in_sqrt: add ``eps`` inside the square root (optax) or outside
        (PyTorch).
      centered: divide by the root of the variance instead of the second
        moment.
      momentum: heavy-ball momentum in [0, 1), or ``None`` for none.
      nesterov: Nesterov momentum (only used with ``momentum``).
      bias_correction: bias-correct the moments.
      state_quantization: block-wise 8- or 4-bit storage of :math:`v` (see
        :func:`adam`); not available with ``centered=True``.
      eight_bit: alias of ``state_quantization`` (``True``: 8 bits).

    Returns:
      The chain ``scale_by_rms`` (or ``scale_by_stddev``),
      ``optax.scale_by_learning_rate``, and ``optax.trace`` if ``momentum``.

    Raises:
      ValueError: if ``decay``/``momentum`` lie outside [0, 1), ``eps`` or
        ``initial_scale`` is negative, ``learning_rate`` is neither a number
        nor a callable, or quantized state is requested with
        ``centered=True``.
      TypeError: as :func:`adam`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt_nn import optim
      >>> tx = optim.rmsprop(0.01, decay=0.5, eps_in_sqrt=False)
      >>> params = jnp.array([1.0, 2.0])
      >>> updates, _ = tx.update(jnp.array([2.0, -1.0]), tx.init(params))
      >>> print(updates.round(5))
      [-0.01414  0.01414]

    References:
      Hinton, `Overview of mini-batch gradient descent
      <https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf>`_, 2012.

      Graves, `Generating Sequences With Recurrent Neural Networks
      <https://arxiv.org/abs/1308.0850>`_, 2013 (Eq. 38-41, centered).

    .. warning::
      The default ``eps_in_sqrt=True`` follows optax; PyTorch's RMSprop is
      ``eps_in_sqrt=False``.
    """
    _check_scalar_or_schedule("learning_rate", learning_rate)
    if momentum is not None:
        _check_unit_interval("momentum", momentum)
    if centered:
        if _quantization(state_quantization, eight_bit) is not None:
            raise ValueError(
                "state_quantization must be None (and eight_bit False) with centered=True "
                "(the variance of two quantized moments can turn negative); got "
                f"state_quantization={state_quantization!r}, eight_bit={eight_bit!r}"
            )
        scale: optax.GradientTransformation = scale_by_stddev(
            decay=decay,
            eps=eps,
            initial_scale=initial_scale,
            eps_in_sqrt=eps_in_sqrt,
            bias_correction=bias_correction,
        )
    else:
        scale = scale_by_rms(
            decay=decay,
            eps=eps,
            initial_scale=initial_scale,
            eps_in_sqrt=eps_in_sqrt,
            bias_correction=bias_correction,
            state_quantization=state_quantization,
            eight_bit=eight_bit,
        )
    return optax.chain(
        scale,
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov)
        if momentum is not None
        else optax.identity(),
    )


nadam = functools.partial(adam, nesterov=True)
nadam.__doc__ = r"""NAdam (Dozat 2016): :func:`adam` with ``nesterov=True``.

    The first moment in the update is
    :math:`\beta_1 m_t / (1 - \beta_1^{t+1}) + (1 - \beta_1) g_t / (1 - \beta_1^t)`;
    the arguments are :func:`adam`'s. In floating point the result equals
    ``optax.nadam``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from jaxopt_nn import optim
      >>> params, grads = jnp.array([1.0, -2.0]), jnp.array([0.5, -0.25])
      >>> updates, _ = optim.nadam(0.1).update(grads, optim.nadam(0.1).init(params))
      >>> expected, _ = optax.nadam(0.1).update(grads, optax.nadam(0.1).init(params))
      >>> bool(jnp.array_equal(updates, expected))
      True

    References:
      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
    """

nadamw = functools.partial(adamw, nesterov=True)
nadamw.__doc__ = r"""NAdamW: :func:`adamw` with ``nesterov=True`` (NAdam, decoupled weight decay).

    The arguments are :func:`adamw`'s. In floating point the result equals
    ``optax.nadamw``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from jaxopt_nn import optim
      >>> params, grads = jnp.array([1.0, -2.0]), jnp.array([0.5, -0.25])
      >>> tx, reference = optim.nadamw(0.1), optax.nadamw(0.1)
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> expected, _ = reference.update(grads, reference.init(params), params)
      >>> bool(jnp.array_equal(updates, expected))
      True

    References:
      Loshchilov, Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
    """
