"""Quantization: uniform affine, fake-quant with STE, k-means weight sharing.

Four tools, each a pure function over arrays or parameter pytrees:

* **Uniform affine quantization** (:func:`quantize`, :func:`dequantize`,
  :func:`quantize_tree`, :func:`dequantize_tree`): integer codes in the
  smallest integer dtype, a ``scale`` and a ``zero_point``, per tensor or per
  channel. Post-training quantization.
* **Fake quantization** (:func:`fake_quant`, :func:`fake_quant_tree`):
  quantize-dequantize in the forward pass with a straight-through estimator in
  the backward pass, for quantization-aware training with any optax optimizer
  (``param_transform`` of :func:`jaxopt_nn.train.make_train_step`).
* **k-means weight sharing** (:func:`kmeans_codebook`, :func:`kmeans_tree`,
  :func:`share_weights`, :func:`centroid_params`, :func:`update_codebooks`):
  Deep Compression's shared weights, computed over the kept (unpruned)
  weights only, and fine-tuning of the shared centroids.
* **Bit packing** (:func:`pack_bits`, :func:`unpack_bits`): ``b``-bit codes
  stored in ``ceil(n * b / 8)`` bytes.

Validation happens on concrete Python values before anything is traced:
``bits`` outside its range raises ``ValueError``; NaN/Inf inputs raise
``ValueError`` when the input is a concrete array (under ``jax.jit`` the values
are not known, the check is skipped, and non-finite inputs give unspecified
codes; run the function eagerly or use ``jax.experimental.checkify`` to check
traced values).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_nn import tree as tree_lib

PyTree = Any
Axis = int | Sequence[int] | None

_MAX_BITS = 16
_PACK_MAX_BITS = 8
_INITS = ("linear", "density", "random")


class Codebook(NamedTuple):
    """Shared weights of one tensor (Deep Compression weight sharing).

    The weight is rebuilt as ``where(mask, centroids[indices], 0)``.
    """

    centroids: jax.Array  # float32, shape (k,), k <= 2**bits
    indices: jax.Array  # uint8 (bits <= 8) or uint16, shape of the weight; 0 where pruned
    mask: jax.Array  # bool, shape of the weight; True where the weight is kept


def codebook_weights(codebook: Codebook, dtype: jax.typing.DTypeLike = jnp.float32) -> jax.Array:
    """The dense weight a codebook stands for: ``where(mask, centroids[indices], 0)``."""
    values = jnp.take(codebook.centroids, codebook.indices.astype(jnp.int32))
    return jnp.where(codebook.mask, values, 0).astype(dtype)


# --------------------------------------------------------------------------- validation


def _check_bits(bits: object, max_bits: int = _MAX_BITS, min_bits: int = 1) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be a Python int; got bits={bits!r}")
    if not min_bits <= bits <= max_bits:
        raise ValueError(f"bits must lie in [{min_bits}, {max_bits}]; got bits={bits!r}")
    return int(bits)


def _check_finite(x: Any, name: str = "x") -> None:
    """Raise on NaN/Inf in a concrete array (checked where it lives); traced arrays pass."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    finite = jnp.isfinite(x)
    try:
        if bool(finite.all()):
            return
    except jax.errors.ConcretizationTypeError:
        return
    bad = int(x.size - finite.sum())
    raise ValueError(f"{name} must be finite; got {bad} NaN/Inf value(s) in {name}")


def _check_float(x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array; got dtype={x.dtype}")


def _kept_axes(ndim: int, axis: Axis) -> tuple[int, ...]:
    """Normalised channel axes (kept in the scale's shape), validated."""
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise ValueError(
                f"axis must be None or int(s) in [{-ndim}, {ndim}) for an array of ndim={ndim}; "
                f"got axis={axis!r}"
            )
    normalised = tuple(sorted({int(a) % ndim for a in axes}))
    if len(normalised) != len(axes):
        raise ValueError(f"axis must not repeat an axis; got axis={axis!r}")
    return normalised


# --------------------------------------------------------------------------- uniform affine


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _code_dtype(bits: int, symmetric: bool) -> jax.typing.DTypeLike:
    if symmetric:
        return jnp.int8 if bits <= 8 else jnp.int16
    return jnp.uint8 if bits <= 8 else jnp.uint16


def _check_symmetric_bits(bits: int, symmetric: bool) -> None:
    if symmetric and bits < 2:
        raise ValueError(f"bits must lie in [2, {_MAX_BITS}] when symmetric=True; got bits={bits}")


def _data_range(x: jax.Array, kept_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(min(x, 0), max(x, 0))`` over every axis but ``kept_axes`` (kept as size 1)."""
    if not kept_axes:
        lo, hi = jnp.min(x, initial=0.0), jnp.max(x, initial=0.0)
    else:
        reduce = tuple(a for a in range(x.ndim) if a not in kept_axes)
        lo = jnp.min(x, axis=reduce, keepdims=True, initial=0.0)
        hi = jnp.max(x, axis=reduce, keepdims=True, initial=0.0)
    return lo.astype(jnp.float32), hi.astype(jnp.float32)


def _affine_params(
    lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(scale, zero_point, lower, upper)`` for a range with ``lo <= 0 <= hi``.

    ``[lower, upper]`` is the range whose values are reconstructed within
    ``scale / 2`` (the straight-through estimator's pass band).
    """
    qmin, qmax = _code_range(bits, symmetric)
    if symmetric:
        bound = jnp.maximum(-lo, hi)
        scale = bound * (1.0 / qmax)
        return scale, jnp.zeros(scale.shape, jnp.int32), -bound, bound
    # A multiply by the Python reciprocal: XLA rewrites division by a constant
    # that way when jitting, and eager and jitted results must agree bitwise.
    scale = (hi - lo) * (1.0 / (qmax - qmin))
    safe = jnp.where(scale > 0, scale, 1.0)
    zero_point = jnp.where(scale > 0, jnp.clip(jnp.round(-lo / safe), qmin, qmax), 0)
    return scale, zero_point.astype(jnp.int32), lo, hi


def _codes(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: int, symmetric: bool
) -> jax.Array:
    qmin, qmax = _code_range(bits, symmetric)
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) / safe) + zero_point, qmin, qmax)


class QuantizedArray(NamedTuple):
    """A uniformly quantized array: ``x ~= (codes - zero_point) * scale``.

    A pytree whose leaves are ``codes``, ``scale`` and ``zero_point``; ``bits``
    and ``dtype`` are static metadata (kept in the tree definition, not
    leaves). So ``jax.jit`` can return a ``QuantizedArray`` with ``bits`` still
    a Python int, ``jax.tree.map`` over it never touches them, and
    ``jax.tree.leaves`` lists only arrays.
    """

    codes: jax.Array  # uint8/uint16 (int8/int16 if symmetric), shape of x
    scale: jax.Array  # float32, shape () per tensor, x's ndim with 1 on reduced axes per channel
    zero_point: jax.Array  # int32, shape of scale; 0 if symmetric
    bits: int  # static, 1..16
    dtype: np.dtype  # static, dtype of the quantized array (what dequantize returns)


jax.tree_util.register_pytree_with_keys(
    QuantizedArray,
    lambda q: (
        tuple((jax.tree_util.GetAttrKey(f), getattr(q, f)) for f in QuantizedArray._fields[:3]),
        (q.bits, q.dtype),
    ),
    lambda static, children: QuantizedArray._make((*children, *static)),
)


def quantize(
    x: jax.Array, bits: int, *, axis: Axis = None, symmetric: bool = False
) -> QuantizedArray:
    """Uniform affine quantization to ``bits``-bit integer codes.

    The range is the data's ``[min(x), max(x)]``, widened to contain 0 so that
    zero (a pruned weight, a padding value) is represented exactly:

    .. math::
      m = \\min(\\min x, 0), \\quad M = \\max(\\max x, 0), \\quad
      s = \\frac{M - m}{2^b - 1}, \\quad z = \\operatorname{round}(-m / s), \\\\
      q = \\operatorname{clip}(\\operatorname{round}(x / s) + z, 0, 2^b - 1),
      \\quad \\hat x = (q - z)\\, s.

    With ``symmetric=True`` the codes are signed, ``z = 0`` and
    :math:`s = \\max|x| / (2^{b-1} - 1)` (codes in
    :math:`[-(2^{b-1} - 1), 2^{b-1} - 1]`, so ``bits >= 2``).

    Every element is reconstructed within half a step,
    :math:`|x - \\hat x| \\le s / 2` (up to float32 rounding).

    Relation to the classic formula
    :math:`q = \\lfloor (W - \\min W) / (\\max W - \\min W) \\cdot (2^b - 1) \\rfloor`
    (Deep Compression's linear quantization; asymmetric, per tensor): it is
    the same grid step :math:`s` when the range contains 0 (the usual case for
    weights), but (1) we round instead of flooring, which halves the worst-case
    error from :math:`s` to :math:`s / 2`; (2) the offset is the integer
    zero point :math:`z`, so 0 maps exactly to code ``z`` and back to 0;
    (3) the range is widened to contain 0 (an all-positive tensor uses
    :math:`[0, \\max W]`); (4) a constant tensor gives :math:`s = 0` instead
    of a division by zero.

    Edge cases: an all-zero tensor (and any tensor whose range is the single
    point 0, e.g. an empty one) has ``scale = 0``, ``zero_point = 0`` and all
    codes 0 and dequantizes to exact zeros; a constant tensor ``c != 0`` is
    reconstructed as ``c`` (it is an end of its range); per channel, each
    channel is handled on its own.

    Args:
      x: a floating-point array.
      bits: code width, a Python int in ``[1, 16]`` (``[2, 16]`` if symmetric).
      axis: ``None`` for one scale per tensor, or the channel axis (or axes)
        that get their own scale, e.g. ``-1`` for the output channels of a
        Dense ``(in, out)`` or conv ``HWIO`` kernel.
      symmetric: signed codes with ``zero_point = 0``.

    Returns:
      A :class:`QuantizedArray`; codes are ``uint8`` (``int8`` if symmetric)
      for ``bits <= 8``, else ``uint16`` (``int16``).

    Raises:
      TypeError: if ``bits`` is not a Python int.
      ValueError: if ``bits`` is out of range, ``axis`` is not an axis of
        ``x``, or a concrete ``x`` holds NaN/Inf.

    Example:
      >>> q = quantize(jnp.array([-1.0, 0.0, 0.5, 2.0]), 2)
      >>> q.codes, q.zero_point, float(q.scale)
      (Array([0, 1, 1, 3], dtype=uint8), Array(1, dtype=int32), 1.0)
      >>> dequantize(q)
      Array([-1.,  0.,  0.,  2.], dtype=float32)

    References:
      Jacob et al., "Quantization and Training of Neural Networks for
      Efficient Integer-Arithmetic-Only Inference",
      https://arxiv.org/abs/1712.05877, 2018 (affine scheme, Eq. 1).
      Han, Mao, Dally, "Deep Compression", https://arxiv.org/abs/1510.00149,
      2016 (linear quantization).
    """
    bits = _check_bits(bits)
    _check_symmetric_bits(bits, symmetric)
    x = jnp.asarray(x)
    _check_float(x)
    kept = _kept_axes(x.ndim, axis)
    _check_finite(x)
    return _quantize(x, bits, kept, symmetric)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x: jax.Array, bits: int, kept: tuple[int, ...], symmetric: bool) -> QuantizedArray:
    lo, hi = _data_range(x, kept)
    scale, zero_point, _, _ = _affine_params(lo, hi, bits, symmetric)
    codes = _codes(x, scale, zero_point, bits, symmetric).astype(_code_dtype(bits, symmetric))
    return QuantizedArray(codes, scale, zero_point, bits, np.dtype(x.dtype))


def dequantize(q: QuantizedArray, dtype: jnp.dtype | None = None) -> jax.Array:
    """``(codes - zero_point) * scale`` as ``dtype`` (see :func:`quantize`).

    Args:
      q: the quantized array.
      dtype: result dtype; default: the dtype of the array that was quantized.

    Example:
      >>> q = quantize(jnp.array([[0.0, 3.0], [-1.0, 2.0]]), 2, axis=0)
      >>> q.scale.shape, q.zero_point.ravel()
      ((2, 1), Array([0, 1], dtype=int32))
      >>> dequantize(q)
      Array([[ 0.,  3.],
             [-1.,  2.]], dtype=float32)
    """
    centred = q.codes.astype(jnp.float32) - q.zero_point.astype(jnp.float32)
    return (centred * q.scale).astype(q.dtype if dtype is None else dtype)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def quantize_tree(
    params: PyTree,
    bits: int,
    *,
    where: tree_lib.Where = None,
    axis: Axis = None,
    symmetric: bool = False,
) -> PyTree:
    """:func:`quantize` every leaf chosen by ``where``; other leaves pass through.

    Args:
      params: a parameter pytree (dict, Linen ``{'params': ...}``, ``nnx.State``).
      bits: code width, ``[1, 16]``.
      where: the selection (default: floating leaves with ``ndim >= 2``; see
        :func:`jaxopt_nn.tree.select`).
      axis: per-tensor (``None``) or per-channel axis, applied to every
        selected leaf (``-1``: output channels of Dense and HWIO conv kernels).
      symmetric: signed codes, ``zero_point = 0``.

    Returns:
      The tree with a :class:`QuantizedArray` in place of each selected leaf.

    Raises:
      TypeError, ValueError: as :func:`quantize`.

    Example:
      >>> params = {'w': jnp.array([[0.0, 1.0], [2.0, 3.0]]), 'b': jnp.ones(2)}
      >>> q = quantize_tree(params, 8)
      >>> type(q['w']).__name__, q['w'].codes.dtype, q['b'].dtype
      ('QuantizedArray', dtype('uint8'), dtype('float32'))
    """
    bits = _check_bits(bits)
    _check_symmetric_bits(bits, symmetric)
    return tree_lib.map_selected(
        lambda x: quantize(x, bits, axis=axis, symmetric=symmetric), params, where=where
    )


def dequantize_tree(params: PyTree, dtype: jnp.dtype | None = None) -> PyTree:
    """Replace every :class:`QuantizedArray` in ``params`` by its dequantized array.

    ``dtype`` is the result dtype; by default each leaf gets back the dtype it
    was quantized from, so ``dequantize_tree(quantize_tree(p, b))`` has the
    dtypes of ``p``.

    Example:
      >>> params = {'w': jnp.array([[0.0, 1.0], [2.0, 3.0]]), 'b': jnp.ones(2)}
      >>> dequantize_tree(quantize_tree(params, 2))['w']
      Array([[0., 1.],
             [2., 3.]], dtype=float32)
    """
    return jax.tree.map(
        lambda x: dequantize(x, dtype) if _is_quantized(x) else x, params, is_leaf=_is_quantized
    )


# --------------------------------------------------------------------------- fake quantization


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fake_quant(
    bits: int, symmetric: bool, x: jax.Array, lo: jax.Array, hi: jax.Array
) -> jax.Array:
    scale, zero_point, _, _ = _affine_params(lo, hi, bits, symmetric)
    codes = _codes(x, scale, zero_point, bits, symmetric)
    return ((codes - zero_point) * scale).astype(x.dtype)


def _fake_quant_fwd(
    bits: int, symmetric: bool, x: jax.Array, lo: jax.Array, hi: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    _, _, lower, upper = _affine_params(lo, hi, bits, symmetric)
    inside = (x >= lower) & (x <= upper)
    return _fake_quant(bits, symmetric, x, lo, hi), (inside, lo, hi)


def _fake_quant_bwd(
    bits: int, symmetric: bool, residuals: tuple[jax.Array, jax.Array, jax.Array], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    del bits, symmetric
    inside, lo, hi = residuals
    return jnp.where(inside, g, 0).astype(g.dtype), jnp.zeros_like(lo), jnp.zeros_like(hi)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: jax.Array,
    bits: int,
    *,
    axis: Axis = None,
    symmetric: bool = False,
    clip: tuple[float | jax.Array, float | jax.Array] | None = None,
) -> jax.Array:
    """Quantize-dequantize in the forward pass, straight-through gradient.

    The forward pass is ``dequantize(quantize(x, bits, ...))`` (same dtype as
    ``x``). The backward pass is the straight-through estimator: the gradient
    passes unchanged where ``x`` lies in the clip range and is zero outside:

    .. math::
      \\frac{\\partial \\hat x}{\\partial x} = \\mathbb{1}[\\ell \\le x \\le u].

    The range ``[l, u]`` is ``[min(x, 0), max(x, 0)]`` (per tensor or per
    channel, treated as a constant: no gradient flows into it), so by default
    every element is inside and the gradient is the identity; with ``clip``
    the range is fixed and the values outside are clipped (gradient 0).
    Symmetric quantization uses ``[-B, B]`` with ``B = max(-l, u)``.

    With ``bits=8, symmetric=True`` this is the arithmetic of the int8 layers
    of :mod:`jaxopt_nn.integer` (the same scale ``B * (1 / 127)``, division
    and round-half-to-even): ``axis=-1`` on a kernel gives their per-output-
    channel weight codes, ``axis`` = every axis but the last on an activation
    their dynamic per-row scales, and ``clip=(-r, r)`` their static range
    ``r``. :func:`jaxopt_nn.integer.to_qat` builds a model from it whose
    logits match the converted int8 model up to float32 rounding.

    Args:
      x: a floating-point array.
      bits: code width, a Python int in ``[1, 16]`` (``[2, 16]`` if symmetric).
      axis: ``None`` (per tensor) or the channel axis/axes, as in :func:`quantize`.
      symmetric: signed codes with ``zero_point = 0``.
      clip: optional fixed range ``(lower, upper)`` with ``lower <= 0 <= upper``
        (scalars, or arrays shaped like a per-channel scale) instead of the
        data range.

    Returns:
      The fake-quantized array, shape and dtype of ``x``.

    Raises:
      TypeError, ValueError: as :func:`quantize`; ``ValueError`` if a
      concrete ``clip`` does not satisfy ``lower <= 0 <= upper``.

    Example:
      >>> x = jnp.array([-2.0, -0.3, 0.4, 1.0])
      >>> fake_quant(x, 3, symmetric=True, clip=(-1.0, 1.0))
      Array([-1.        , -0.33333334,  0.33333334,  1.        ], dtype=float32)
      >>> jax.grad(lambda x: fake_quant(x, 3, symmetric=True, clip=(-1.0, 1.0)).sum())(x)
      Array([0., 1., 1., 1.], dtype=float32)

    References:
      Bengio, Leonard, Courville, "Estimating or Propagating Gradients Through
      Stochastic Neurons for Conditional Computation",
      https://arxiv.org/abs/1308.3432, 2013 (straight-through estimator).
      Jacob et al., https://arxiv.org/abs/1712.05877, 2018 (Section 3,
      simulated quantization in training).
    """
    bits = _check_bits(bits)
    _check_symmetric_bits(bits, symmetric)
    x = jnp.asarray(x)
    _check_float(x)
    kept = _kept_axes(x.ndim, axis)
    _check_finite(x)
    if clip is None:
        lo, hi = _data_range(jax.lax.stop_gradient(x), kept)
    else:
        lower, upper = clip
        try:  # concrete bounds are checked; traced ones (learned ranges) cannot be
            concrete = float(lower), float(upper)
        except jax.errors.ConcretizationTypeError:
            concrete = None
        if concrete is not None and not concrete[0] <= 0 <= concrete[1]:
            raise ValueError(f"clip must satisfy lower <= 0 <= upper; got clip={clip!r}")
        lo = jnp.minimum(jax.lax.stop_gradient(jnp.asarray(lower, jnp.float32)), 0.0)
        hi = jnp.maximum(jax.lax.stop_gradient(jnp.asarray(upper, jnp.float32)), 0.0)
    return _fake_quant(bits, symmetric, x, lo, hi)


def fake_quant_tree(
    params: PyTree,
    bits: int,
    *,
    where: tree_lib.Where = None,
    axis: Axis = None,
    symmetric: bool = False,
) -> PyTree:
    """:func:`fake_quant` every leaf chosen by ``where`` (quantization-aware training).

    Use it as the ``param_transform`` of :func:`jaxopt_nn.train.make_train_step`
    or :func:`jaxopt_nn.train.fit`: the loss sees fake-quantized weights, the
    straight-through gradient reaches the float weights, and any optax
    optimizer updates them. After training, :func:`quantize_tree` with the same
    arguments gives the weights the loss saw (up to float32 rounding).

    Args:
      params: a parameter pytree.
      bits: code width, ``[1, 16]``.
      where: the selection (default: kernels, floating leaves with ``ndim >= 2``).
      axis: per-tensor (``None``) or per-channel axis for every selected leaf.
      symmetric: signed codes, ``zero_point = 0``.

    Returns:
      The tree with the selected leaves fake-quantized.

    Example:
      >>> import functools, optax
      >>> params = {'w': jnp.array([[0.1, -0.4], [0.7, 0.2]]), 'b': jnp.zeros(2)}
      >>> qat = functools.partial(fake_quant_tree, bits=4)
      >>> loss = lambda p: jnp.sum(qat(p)['w'] ** 2) + jnp.sum(p['b'] ** 2)
      >>> grads = jax.grad(loss)(params)
      >>> updates, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params))
      >>> jax.tree.map(jnp.shape, optax.apply_updates(params, updates))
      {'b': (2,), 'w': (2, 2)}

    References:
      Jacob et al., https://arxiv.org/abs/1712.05877, 2018.
    """
    bits = _check_bits(bits)
    _check_symmetric_bits(bits, symmetric)
    return tree_lib.map_selected(
        lambda x: fake_quant(x, bits, axis=axis, symmetric=symmetric), params, where=where
    )


# --------------------------------------------------------------------------- k-means sharing


def _index_dtype(bits: int) -> jax.typing.DTypeLike:
    return jnp.uint8 if bits <= 8 else jnp.uint16


def _nearest(centroids: jax.Array, values: jax.Array) -> jax.Array:
    """Index of the nearest of the sorted ``centroids`` for each value (1-D)."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    return jnp.searchsorted(midpoints, values, side="left").astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("bits", "init", "iters"))
def _kmeans(
    x: jax.Array, kept: jax.Array, key: jax.Array | None, *, bits: int, init: str, iters: int
) -> Codebook:
    k = 2**bits
    values = x.reshape(-1).astype(jnp.float32)
    flags = kept.reshape(-1)
    n = jnp.sum(flags)
    lo = jnp.where(n > 0, jnp.min(jnp.where(flags, values, jnp.inf)), 0.0)
    hi = jnp.where(n > 0, jnp.max(jnp.where(flags, values, -jnp.inf)), 0.0)
    if init == "linear":
        centroids = jnp.linspace(lo, hi, k, dtype=jnp.float32)
    elif init == "density":
        ordered = jnp.sort(jnp.where(flags, values, jnp.inf))
        rank = jnp.round(jnp.linspace(0.0, 1.0, k) * (n - 1).astype(jnp.float32))
        centroids = ordered[jnp.clip(rank.astype(jnp.int32), 0, values.size - 1)]
    else:
        assert key is not None  # kmeans_codebook refuses init='random' without a key
        weights = jnp.where(n > 0, flags / jnp.maximum(n, 1), 1.0 / values.size)
        centroids = jax.random.choice(key, values, (k,), replace=True, p=weights)
    centroids = jnp.sort(jnp.where(n > 0, centroids, 0.0))
    kept_values = jnp.where(flags, values, 0.0)
    counts_in = flags.astype(jnp.float32)

    def lloyd(
        carry: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        step, centroids, _ = carry
        members = _nearest(centroids, values)
        sums = jax.ops.segment_sum(kept_values, members, num_segments=k)
        counts = jax.ops.segment_sum(counts_in, members, num_segments=k)
        new = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centroids)
        new = jnp.sort(new)
        return step + 1, new, jnp.any(new != centroids)

    def unfinished(carry: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        step, _, changed = carry
        return (step < iters) & changed

    _, centroids, _ = jax.lax.while_loop(
        unfinished, lloyd, (jnp.int32(0), centroids, jnp.bool_(True))
    )
    indices = jnp.where(flags, _nearest(centroids, values), 0).astype(_index_dtype(bits))
    return Codebook(centroids, indices.reshape(x.shape), kept)


def _check_kmeans_args(init: object, iters: object) -> None:
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}; got init={init!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be an int >= 0; got iters={iters!r}")


def kmeans_codebook(
    x: jax.Array,
    bits: int,
    *,
    init: str = "linear",
    iters: int = 30,
    mask: jax.Array | None = None,
    key: jax.Array | None = None,
) -> Codebook:
    """k-means weight sharing: ``2**bits`` shared values for the kept weights.

    Lloyd's algorithm in one dimension, over the kept weights only (``mask``,
    or the nonzero weights when ``mask`` is ``None``), jit-compiled
    (``lax.while_loop``; it stops after ``iters`` iterations or when the
    centroids no longer move). It minimises the within-cluster squared error

    .. math::
      \\min_{c, a} \\sum_{i:\\, m_i} (w_i - c_{a_i})^2 .

    Centroids are kept sorted, so the assignment is a binary search among the
    midpoints (``O(n log k)``, no ``n x k`` distance matrix). An empty cluster
    keeps its previous centroid. Initialisations: ``'linear'`` spaces the
    centroids evenly between the min and max of the kept weights (the best in
    Deep Compression, it keeps the rare large weights); ``'density'`` puts
    them at evenly spaced quantiles of the kept weights; ``'random'`` draws
    ``2**bits`` kept weights (Forgy; needs ``key``).

    Edge cases: with no kept weight (all pruned, or empty ``x``) every
    centroid is 0; with fewer distinct values than centroids some centroids
    repeat or stay unused.

    Args:
      x: the weight, any shape, floating point.
      bits: index width, ``[1, 16]``; ``k = 2**bits`` centroids.
      init: ``'linear'``, ``'density'`` or ``'random'``.
      iters: maximum number of Lloyd iterations, ``>= 0``.
      mask: optional bool array of ``x``'s shape, ``True`` where kept.
      key: a ``jax.random.key``, required for ``init='random'``.

    Returns:
      :class:`Codebook` with float32 ``centroids`` of shape ``(2**bits,)``
      (sorted after clustering), ``indices`` (uint8 for ``bits <= 8``, else
      uint16; 0 where pruned) and ``mask``.

    Raises:
      TypeError: if ``bits`` is not a Python int.
      ValueError: for ``bits``, ``init`` or ``iters`` out of range, a ``mask``
        of another shape, ``init='random'`` without ``key``, or a concrete
        ``x`` with NaN/Inf.

    Example:
      >>> w = jnp.array([0.0, 0.1, 0.12, 0.9, 1.0, 0.0])
      >>> cb = kmeans_codebook(w, 1)
      >>> cb.centroids, cb.indices
      (Array([0.11, 0.95], dtype=float32), Array([0, 0, 0, 1, 1, 0], dtype=uint8))
      >>> cb.mask
      Array([False,  True,  True,  True,  True, False], dtype=bool)
      >>> codebook_weights(cb)
      Array([0.  , 0.11, 0.11, 0.95, 0.95, 0.  ], dtype=float32)

    References:
      Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks
      with Pruning, Trained Quantization and Huffman Coding",
      https://arxiv.org/abs/1510.00149, 2016 (Section 3.1 weight sharing,
      Section 3.2 initialisation).
    """
    bits = _check_bits(bits)
    _check_kmeans_args(init, iters)
    x = jnp.asarray(x)
    _check_float(x)
    if mask is None:
        kept = x != 0
    else:
        kept = jnp.asarray(mask, bool)
        if kept.shape != x.shape:
            raise ValueError(
                f"mask must have the shape of x {x.shape}; got mask.shape={kept.shape}"
            )
    if init == "random" and key is None:
        raise ValueError("key must be a jax.random.key when init='random'; got key=None")
    _check_finite(x)
    if x.size == 0:
        return Codebook(
            jnp.zeros(2**bits, jnp.float32), jnp.zeros(x.shape, _index_dtype(bits)), kept
        )
    return _kmeans(x, kept, key if init == "random" else None, bits=bits, init=init, iters=iters)


def _names_dict(tree: PyTree | Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if tree is None else dict(tree_lib.leaves_with_names(tree))


def kmeans_tree(
    params: PyTree,
    bits: int | Mapping[str, int],
    *,
    where: tree_lib.Where = None,
    masks: PyTree | None = None,
    init: str = "linear",
    iters: int = 30,
    key: jax.Array | None = None,
) -> dict[str, Codebook]:
    """:func:`kmeans_codebook` for every leaf chosen by ``where``.

    Args:
      params: a parameter pytree (dict, Linen dict, ``nnx.State``).
      bits: one width for every selected leaf, or a mapping from leaf name
        (``'fc1/kernel'``) to width that names every selected leaf.
      where: the selection (default: kernels).
      masks: optional keep-masks, as a pytree whose leaf names match the
        params' (e.g. a pruning-mask tree or ``{'fc1/kernel': mask}``); a
        selected leaf without a mask uses its nonzero weights.
      init: ``'linear'``, ``'density'`` or ``'random'``.
      iters: maximum Lloyd iterations.
      key: a ``jax.random.key``, required for ``init='random'`` (folded with
        the leaf's position).

    Returns:
      ``{name: Codebook}`` for the selected leaves, in tree order.

    Raises:
      TypeError, ValueError: as :func:`kmeans_codebook`; ``ValueError`` if a
      bits mapping misses a selected leaf or names a leaf that is not selected.

    Example:
      >>> params = {'w': jnp.array([[0.0, 1.0], [2.0, 3.0]]), 'b': jnp.ones(2)}
      >>> books = kmeans_tree(params, {'w': 1})
      >>> list(books), books['w'].centroids, books['w'].indices
      (['w'], Array([1.5, 3. ], dtype=float32), Array([[0, 0],
             [0, 1]], dtype=uint8))
    """
    _check_kmeans_args(init, iters)
    names = tree_lib.selected_names(params, where)
    if isinstance(bits, Mapping):
        values = tree_lib.values_by_name(bits, names, "bits")
        widths = {name: _check_bits(value) for name, value in zip(names, values, strict=True)}
    else:
        widths = dict.fromkeys(names, _check_bits(bits))
    if init == "random" and key is None:
        raise ValueError("key must be a jax.random.key when init='random'; got key=None")
    leaves = _names_dict(params)
    mask_by_name = _names_dict(masks)
    return {
        name: kmeans_codebook(
            leaves[name],
            widths[name],
            init=init,
            iters=iters,
            mask=mask_by_name.get(name),
            key=None if key is None else jax.random.fold_in(key, i),
        )
        for i, name in enumerate(names)
    }


def _check_codebooks(params: PyTree, codebooks: Mapping[str, Codebook]) -> dict[str, Any]:
    leaves = _names_dict(params)
    missing = [name for name in codebooks if name not in leaves]
    if missing:
        raise ValueError(f"codebooks name leaves that params lack: {missing}")
    for name, book in codebooks.items():
        if tuple(book.indices.shape) != tuple(np.shape(leaves[name])):
            raise ValueError(
                f"codebook {name!r} has indices of shape {tuple(book.indices.shape)}; "
                f"the leaf has shape {tuple(np.shape(leaves[name]))}"
            )
    return leaves


def share_weights(params: PyTree, codebooks: Mapping[str, Codebook]) -> PyTree:
    """Replace each leaf named in ``codebooks`` by its shared weight.

    Every rebuilt weight equals one of its centroids where kept and exactly 0
    where pruned (:func:`codebook_weights`), in the leaf's dtype.

    Args:
      params: a parameter pytree.
      codebooks: ``{name: Codebook}`` as from :func:`kmeans_tree`.

    Returns:
      The tree with the shared weights.

    Raises:
      ValueError: if a codebook names a missing leaf or has another shape.

    Example:
      >>> params = {'w': jnp.array([[0.0, 1.0], [2.1, 2.9]]), 'b': jnp.ones(2)}
      >>> share_weights(params, kmeans_tree(params, 1))['w']
      Array([[0. , 1. ],
             [2.5, 2.5]], dtype=float32)
    """
    _check_codebooks(params, codebooks)
    return tree_lib.map_with_names(
        lambda name, leaf: (
            codebook_weights(codebooks[name], leaf.dtype) if name in codebooks else leaf
        ),
        params,
    )


def centroid_params(
    params: PyTree, codebooks: Mapping[str, Codebook]
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """Split shared weights into trainable centroids and a rebuild function.

    Returns ``(trainable, rebuild)``: ``trainable`` is ``params`` with each
    leaf named in ``codebooks`` replaced by its centroid vector ``(k,)`` (other
    leaves, e.g. biases, unchanged and trainable); ``rebuild(trainable)`` gives
    the dense params, ``where(mask, centroids[indices], 0)`` for the shared
    leaves. Differentiating a loss through ``rebuild`` gives each centroid the
    sum of its members' gradients (the VJP of the gather is a scatter-add),
    and pruned weights get no gradient and stay exactly 0:

    .. math::
      \\frac{\\partial L}{\\partial c_k} = \\sum_{i:\\, a_i = k,\\, m_i}
      \\frac{\\partial L}{\\partial w_i}.

    So any optax optimizer fine-tunes the centroids: put ``trainable`` in the
    state and pass ``rebuild`` as ``param_transform`` to
    :func:`jaxopt_nn.train.make_train_step` (and to
    :func:`jaxopt_nn.train.evaluate`)::

        graphdef, state = train.init_train_state(model, tx)
        trainable, rebuild = centroid_params(state.params, codebooks)
        state = train.TrainState(trainable, state.rest, tx.init(trainable))
        step = train.make_train_step(graphdef, tx, param_transform=rebuild)
        for x, y in data.batches(...):
            state, metrics = step(state, x, y)
        codebooks = update_codebooks(codebooks, state.params)  # for the archive
        params = rebuild(state.params)                          # dense weights

    Every rebuilt weight stays equal to one of the (updated) centroids. To keep
    the unshared leaves frozen, give them a zero update, e.g.
    ``optax.multi_transform`` with ``optax.set_to_zero()``.

    Args:
      params: a parameter pytree.
      codebooks: ``{name: Codebook}`` as from :func:`kmeans_tree`.

    Returns:
      ``(trainable, rebuild)``; ``rebuild`` closes over the codebooks' indices
      and masks and returns leaves in the original dtypes.

    Raises:
      ValueError: if a codebook names a missing leaf or has another shape.

    Example:
      >>> import optax
      >>> params = {'w': jnp.array([[0.0, 1.0], [2.1, 2.9]]), 'b': jnp.zeros(2)}
      >>> trainable, rebuild = centroid_params(params, kmeans_tree(params, 1))
      >>> trainable['w']
      Array([1. , 2.5], dtype=float32)
      >>> loss = lambda t: jnp.sum(rebuild(t)['w'])
      >>> jax.grad(loss)(trainable)['w']  # members per centroid
      Array([1., 2.], dtype=float32)
      >>> tx = optax.sgd(0.1)
      >>> updates, _ = tx.update(jax.grad(loss)(trainable), tx.init(trainable))
      >>> rebuild(optax.apply_updates(trainable, updates))['w']
      Array([[0. , 0.9],
             [2.3, 2.3]], dtype=float32)

    References:
      Han, Mao, Dally, "Deep Compression", https://arxiv.org/abs/1510.00149,
      2016 (Section 3.3, Eq. 3: centroid gradient).
    """
    leaves = _check_codebooks(params, codebooks)
    dtypes = {name: jnp.asarray(leaves[name]).dtype for name in codebooks}
    frozen = {name: (book.indices, book.mask) for name, book in codebooks.items()}
    trainable = tree_lib.map_with_names(
        lambda name, leaf: codebooks[name].centroids if name in codebooks else leaf, params
    )

    def rebuild(trainable: PyTree) -> PyTree:
        return tree_lib.map_with_names(
            lambda name, leaf: (
                codebook_weights(Codebook(leaf, *frozen[name]), dtypes[name])
                if name in frozen
                else leaf
            ),
            trainable,
        )

    return trainable, rebuild


def update_codebooks(codebooks: Mapping[str, Codebook], trainable: PyTree) -> dict[str, Codebook]:
    """The codebooks with the centroids of a trained ``trainable`` tree.

    Args:
      codebooks: the codebooks given to :func:`centroid_params`.
      trainable: the (fine-tuned) first output of :func:`centroid_params`.

    Returns:
      ``{name: Codebook}`` with the new float32 centroids, same indices and masks.

    Raises:
      ValueError: if a leaf is missing or its centroid count changed.

    Example:
      >>> params = {'w': jnp.array([[0.0, 1.0], [2.0, 3.0]])}
      >>> books = kmeans_tree(params, 1)
      >>> trainable, _ = centroid_params(params, books)
      >>> update_codebooks(books, {'w': trainable['w'] * 2})['w'].centroids
      Array([3., 6.], dtype=float32)
    """
    leaves = _names_dict(trainable)
    updated = {}
    for name, book in codebooks.items():
        centroids = leaves.get(name)
        if centroids is None or np.shape(centroids) != book.centroids.shape:
            raise ValueError(
                f"trainable must hold centroids of shape {book.centroids.shape} at {name!r}; "
                f"got {None if centroids is None else np.shape(centroids)}"
            )
        updated[name] = book._replace(centroids=jnp.asarray(centroids, jnp.float32))
    return updated


# --------------------------------------------------------------------------- bit packing


def packed_size(count: int, bits: int) -> int:
    """Bytes that :func:`pack_bits` uses for ``count`` codes: ``ceil(count * bits / 8)``."""
    return math.ceil(count * bits / 8)


def pack_bits(codes: Any, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes densely, most significant bit first.

    Code ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream
    (bit 0 being the most significant bit of byte 0); the last byte is padded
    with zero bits. Vectorised numpy (``np.packbits``). Signed codes (from
    ``quantize(..., symmetric=True)``) must be offset by ``2**(bits - 1)``
    first.

    Args:
      codes: integer array-like of any shape (flattened in C order), values in
        ``[0, 2**bits)``.
      bits: code width, ``[1, 8]``.

    Returns:
      A 1-D uint8 array of ``ceil(codes.size * bits / 8)`` bytes.

    Raises:
      TypeError: if ``codes`` is not integer or ``bits`` not an int.
      ValueError: if ``bits`` is out of ``[1, 8]`` or a code does not fit.

    Example:
      >>> buf = pack_bits([1, 2, 3, 0, 1], 2)
      >>> buf, unpack_bits(buf, 2, 5)
      (array([108,  64], dtype=uint8), array([1, 2, 3, 0, 1], dtype=uint8))
    """
    bits = _check_bits(bits, _PACK_MAX_BITS)
    values = np.asarray(codes).reshape(-1)
    if values.size and not np.issubdtype(values.dtype, np.integer):
        raise TypeError(f"codes must be integers; got dtype={values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(
            f"codes must lie in [0, {2**bits - 1}] for bits={bits}; "
            f"got values in [{values.min()}, {values.max()}]"
        )
    values = values.astype(np.uint8)
    if bits == 8:
        return values.copy()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    planes = (values[:, None] >> shifts[None, :]) & np.uint8(1)
    return np.packbits(planes.reshape(-1))


def unpack_bits(buf: Any, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes of ``bits`` bits as uint8.

    Args:
      buf: 1-D uint8 array-like (or ``bytes``) of exactly
        ``ceil(count * bits / 8)`` bytes.
      bits: code width, ``[1, 8]``.
      count: number of codes, ``>= 0``.

    Returns:
      A 1-D uint8 array of ``count`` codes (reshape to the original shape).

    Raises:
      TypeError: if ``bits`` or ``count`` is not an int.
      ValueError: if ``bits`` is out of range, ``count < 0`` or ``buf`` has
        another length.
    """
    bits = _check_bits(bits, _PACK_MAX_BITS)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be an int; got count={count!r}")
    if count < 0:
        raise ValueError(f"count must be >= 0; got count={count}")
    data = np.frombuffer(buf, np.uint8) if isinstance(buf, (bytes, bytearray)) else np.asarray(buf)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"buf must be 1-D uint8; got dtype={data.dtype}, ndim={data.ndim}")
    need = packed_size(int(count), bits)
    if data.size != need:
        raise ValueError(
            f"buf must hold ceil(count * bits / 8) = {need} bytes for count={count}, "
            f"bits={bits}; got {data.size}"
        )
    if bits == 8:
        return data.copy()
    planes = np.unpackbits(data, count=int(count) * bits).reshape(int(count), bits)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    return np.bitwise_or.reduce(planes << shifts[None, :], axis=1).astype(np.uint8)
