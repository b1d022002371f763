"""Integer inference: int8 layers that compute ``int8 x int8 -> int32``.

A quantized weight only makes a model faster if the product itself runs on
integers. :class:`Int8Linear` and :class:`Int8Conv` hold symmetric int8
weights with one float32 scale per output channel and quantize their input
to int8 on the fly; the product is an ``int8 x int8 -> int32``
``lax.dot_general`` / ``lax.conv_general_dilated`` followed by one fused
float32 rescale and the bias:

.. math::
  s_x = \\frac{r_x}{127}, \\quad q_x = \\operatorname{clip}(\\operatorname{round}(x / s_x),
  -127, 127), \\quad s_w = \\frac{\\max_{i} |W_{i,o}|}{127}, \\quad
  y = (q_x q_W)\\, s_x s_w + b.

The activation range :math:`r_x` is either **dynamic** (default): the
absolute maximum of each row of a dense input (each token) or of each example
of a convolution input, computed at every call; or **static**: one number per
layer recorded by :func:`calibrate` (absolute maximum or a percentile of
``|x|`` over calibration batches), larger inputs saturate at
:math:`\\pm 127 s_x`.

Error bound (symmetric rounding to nearest, no saturation): every element is
off by at most half a step, :math:`|x - s_x q_x| \\le s_x / 2` and
:math:`|W - s_w q_W| \\le s_w / 2`, so each output of a layer with reduction
size :math:`K` satisfies

.. math::
  |y - \\hat y| \\le \\tfrac{1}{2} \\sum_k \\left(s_x |W_{k,o}| + s_{w,o} |x_k|\\right)
  + \\tfrac{K}{4} s_x s_{w,o}
  \\le \\tfrac{K}{127}\\, r_x \\max_k |W_{k,o}|\\, \\left(1 + \\tfrac{1}{254}\\right),

plus the float32 rounding of the rescale (the int32 sum is exact while
:math:`K \\cdot 127^2 < 2^{31}`, i.e. :math:`K < 133{,}143`). A saturated
static input adds :math:`|x_k| - r_x` per clipped element.

Conversion: :func:`to_int8` returns a new model in which the chosen
``nnx.Linear`` / ``nnx.Conv`` layers are int8 twins; :func:`fold_batchnorm`
first folds each batch norm into the convolution before it (ResNet).
Quantization-aware training that matches the int8 model: :func:`to_qat`
wraps the same layers in :class:`FakeQuant`, which applies
:func:`jaxopt_nn.quantization.fake_quant` with exactly the scales and rounding
of the int8 layers; ``to_int8(to_qat(model))`` gives the same logits up to
float32 rounding.

When int8 loses: quantizing the input, the int32 product and the rescale cost
more than a float32 product for small layers and small batches. With
``fallback=True`` (default) :func:`to_int8` keeps a layer in float32 unless
its product is large enough (see :func:`int8_plan`, which says why for each
layer); ``fallback='measure'`` times each layer on the serving batch instead
and keeps the fastest of float32, int8 and, for convolutions, float32 im2col
(:class:`Im2colConv`, which on small images beats XLA's convolution by more
than int8 adds). Stems with few input channels stay float in both modes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxopt_nn.quantization import _affine_params, _codes, fake_quant
from jaxopt_nn.speed import compare_latency

_BITS = 8
_METHODS = ("absmax", "percentile")
# The fallback rule (int8_plan), measured with benchmarks/integer.py: int8
# when a call multiplies at least _MIN_ROWS rows (batch x output pixels) and
# the dense weight has at least _MIN_WEIGHT elements (K x N) or the
# convolution window x input channels is at least _MIN_DEPTH.
_MIN_ROWS = 16
_MIN_WEIGHT = 16_384
_MIN_DEPTH = 64
# fallback='measure': int8 only where its median time per call beats float32's
# by this factor, so that timing noise does not pick a slower int8 layer.
_MEASURE_MARGIN = 1.05
_MEASURE_ROUNDS = 15
_MEASURE_SECONDS = 3e-3  # seconds of calls per timed round
_FALLBACKS = (True, False, "measure")
_SUPPORTED = (nnx.Linear, nnx.Conv)
_LAX_PADDING = ("SAME", "VALID")

Where = Callable[[str, nnx.Module], bool] | Iterable[str] | None


# --------------------------------------------------------------------------- quantizers


def _symmetric_scale(bound: jax.Array) -> jax.Array:
    """``bound / 127``, computed exactly as :func:`~jaxopt_nn.quantization.fake_quant` does."""
    scale, _, _, _ = _affine_params(-bound, bound, _BITS, True)
    return scale


def _to_int8(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``clip(round(x / scale), -127, 127)`` as int8 (0 where ``scale == 0``)."""
    return _codes(x, scale, jnp.zeros((), jnp.int32), _BITS, True).astype(jnp.int8)


def quantize_weight(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes and per-output-channel scales of a kernel.

    The output channels are the last axis (Dense ``(in, out)``, conv
    ``HWIO``); the scale is :math:`\\max |W_{\\cdot, o}| / 127` and the codes
    are ``clip(round(W / s), -127, 127)``, the same numbers as
    ``quantize(kernel, 8, axis=-1, symmetric=True)``.

    Args:
      kernel: a floating-point kernel, output channels last.

    Returns:
      ``(codes, scale)``: int8 of the kernel's shape and float32 of shape ``(out,)``.

    Example:
      >>> codes, scale = quantize_weight(jnp.array([[1.0, -0.5], [-2.0, 0.25]]))
      >>> codes
      Array([[  64, -127],
             [-127,   64]], dtype=int8)
      >>> scale * 127
      Array([2. , 0.5], dtype=float32)
    """
    kernel = jnp.asarray(kernel)
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"kernel must be floating point; got dtype={kernel.dtype}")
    reduce = tuple(range(kernel.ndim - 1))
    bound = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=reduce, keepdims=True)
    scale = _symmetric_scale(bound)
    return _to_int8(kernel, scale), scale.reshape(-1)


def _row_scale(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Dynamic scale: ``max |x| / 127`` over ``axes`` (kept as size 1)."""
    return _symmetric_scale(jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True))


# --------------------------------------------------------------------------- products


class _ConvSpec:
    """The static configuration of an ``nnx.Conv`` that a product needs."""

    def __init__(self, layer: nnx.Conv, name: str):
        rank = len(layer.kernel_size)

        def broadcast(value: int | Sequence[int] | None) -> tuple[int, ...]:
            if value is None:
                return (1,) * rank
            return (value,) * rank if isinstance(value, int) else tuple(value)

        padding = layer.padding
        if isinstance(padding, str):
            if padding not in _LAX_PADDING:
                raise ValueError(
                    f"layer {name!r}: padding={padding!r} is not supported by int8 "
                    f"convolutions; allowed: {_LAX_PADDING} or explicit (low, high) pairs"
                )
        elif isinstance(padding, int):
            padding = ((padding, padding),) * rank
        else:
            padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
        self.rank = rank
        self.strides = broadcast(layer.strides)
        self.padding = padding
        self.input_dilation = broadcast(layer.input_dilation)
        self.kernel_dilation = broadcast(layer.kernel_dilation)
        self.groups = int(layer.feature_group_count)


def _conv(x: jax.Array, kernel: jax.Array, spec: Any, preferred: Any) -> jax.Array:
    """Channels-last convolution (``N...C`` input, ``...IO`` kernel) as ``nnx.Conv``."""
    spatial = tuple(range(1, x.ndim - 1))
    numbers = lax.ConvDimensionNumbers(
        (0, x.ndim - 1, *spatial),
        (x.ndim - 1, x.ndim - 2, *range(x.ndim - 2)),
        (0, x.ndim - 1, *spatial),
    )
    return lax.conv_general_dilated(
        x,
        kernel,
        spec.strides,
        spec.padding,
        lhs_dilation=spec.input_dilation,
        rhs_dilation=spec.kernel_dilation,
        dimension_numbers=numbers,
        feature_group_count=spec.groups,
        preferred_element_type=preferred,
    )


def _patch_conv(
    x: jax.Array, kernel: jax.Array, spec: Any, preferred: Any = jnp.int32
) -> jax.Array:
    """``int8 x int8 -> int32`` convolution as one ``dot_general`` over im2col patches.

    XLA's CPU convolution of int8 operands is slow for few channels (0.2x
    float32 for a 3x3, 16 -> 16 convolution); gathering the
    ``prod(window)`` shifted views of the padded input (int8, so cheap) and
    contracting them with the ``(prod(window) * in, out)`` kernel in one
    integer matrix product is what makes int8 convolutions pay off. Used for
    ungrouped convolutions without input dilation (others go through
    :func:`_conv`); the sums are exact integers, so both give the same result.
    With float operands and ``preferred=jnp.float32`` it is the same algorithm
    in float32 (the baseline that separates im2col's gain from int8's in
    ``benchmarks/integer.py``).
    """
    window = kernel.shape[:-2]
    dilated = [(k - 1) * d + 1 for k, d in zip(window, spec.kernel_dilation, strict=True)]
    pads = spec.padding
    if isinstance(pads, str):
        pads = lax.padtype_to_pads(x.shape[1:-1], dilated, spec.strides, pads)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:-1], dilated, spec.strides, strict=True)]
    views = []
    for offset in np.ndindex(*window):
        start = (0, *(o * d for o, d in zip(offset, spec.kernel_dilation, strict=True)), 0)
        limit = (
            x.shape[0],
            *(b + (n - 1) * s + 1 for b, n, s in zip(start[1:-1], out, spec.strides, strict=True)),
            x.shape[-1],
        )
        views.append(lax.slice(x, start, limit, (1, *spec.strides, 1)))
    patches = jnp.concatenate(views, axis=-1)
    return _dense(patches, kernel.reshape(-1, kernel.shape[-1]), preferred)


def _patchable(spec: Any) -> bool:
    """Whether :func:`_patch_conv` computes this convolution (ungrouped, no input dilation)."""
    return spec.groups == 1 and all(d == 1 for d in spec.input_dilation)


def _dense(x: jax.Array, kernel: jax.Array, preferred: Any) -> jax.Array:
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return lax.dot_general(x, kernel, dims, preferred_element_type=preferred)


def _channels_last(v: jax.Array, ndim: int) -> jax.Array:
    return v.reshape((1,) * (ndim - 1) + (-1,))


def _flatten_batch(x: jax.Array, rank: int) -> tuple[jax.Array, tuple[int, ...] | None]:
    """Inputs with 0 or 2+ batch axes as one batch axis (as ``nnx.Conv``), and the shape back."""
    batch_axes = x.ndim - rank - 1
    if batch_axes == 1:
        return x, None
    return x.reshape((-1, *x.shape[batch_axes:])), x.shape[:batch_axes]


def _restore_batch(y: jax.Array, batch_shape: tuple[int, ...] | None) -> jax.Array:
    return y if batch_shape is None else y.reshape(batch_shape + y.shape[1:])


# --------------------------------------------------------------------------- int8 layers


def _input_scale(input_range: Any) -> nnx.Variable | None:
    if input_range is None:
        return None
    bound = jnp.asarray(input_range, jnp.float32).reshape(())
    return nnx.Param(_symmetric_scale(bound))


def _check_layer(layer: Any, kind: type, name: str) -> None:
    if not isinstance(layer, kind):
        raise TypeError(f"{name} must be an {kind.__qualname__}; got {type(layer).__name__}")


class Int8Linear(nnx.Module):
    """A dense layer computing ``int8 x int8 -> int32`` (see the module docstring).

    Build it from a float layer with :meth:`from_linear` (or let
    :func:`to_int8` do it). ``kernel`` holds int8 codes ``(in, out)``,
    ``scale`` the float32 per-output-channel weight scales, ``bias`` the
    float32 bias (or ``None``) and ``input_scale`` the static activation scale
    (a float32 scalar; ``None`` for dynamic per-row scales). Inputs have shape
    ``(..., in)``; each row (each vector along the last axis) gets its own
    dynamic scale, so the layer gives the same result under ``jax.vmap``.

    Example:
      >>> dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> q = Int8Linear.from_linear(dense)
      >>> q.kernel.dtype, q.scale.shape, q.input_scale
      (dtype('int8'), (3,), None)
      >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
      >>> bool(jnp.allclose(q(x), dense(x), atol=0.02))
      True
    """

    def __init__(
        self,
        kernel: jax.Array,
        scale: jax.Array,
        bias: jax.Array | None = None,
        *,
        input_scale: jax.Array | None = None,
    ):
        kernel, scale = jnp.asarray(kernel), jnp.asarray(scale, jnp.float32)
        if kernel.dtype != jnp.int8 or kernel.ndim != 2:
            raise ValueError(
                f"kernel must be a 2-D int8 array (in, out); got {kernel.dtype} {kernel.shape}"
            )
        if scale.shape != kernel.shape[-1:]:
            raise ValueError(f"scale must have shape {kernel.shape[-1:]}; got {scale.shape}")
        self.kernel = nnx.Param(kernel)
        self.scale = nnx.Param(scale)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))
        self.input_scale = (
            None if input_scale is None else nnx.Param(jnp.asarray(input_scale, jnp.float32))
        )

    @classmethod
    def from_linear(cls, layer: nnx.Linear, *, input_range: Any = None) -> Int8Linear:
        """The int8 twin of ``layer``; ``input_range`` (a positive number) makes it static."""
        _check_layer(layer, nnx.Linear, "layer")
        codes, scale = quantize_weight(layer.kernel[...])
        bias = None if layer.bias is None else layer.bias[...]
        scale_var = _input_scale(input_range)
        return cls(codes, scale, bias, input_scale=None if scale_var is None else scale_var[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(..., in) -> (..., out)`` float32."""
        x = jnp.asarray(x)
        if self.input_scale is None:
            s_x = _row_scale(x, (x.ndim - 1,))
        else:
            s_x = self.input_scale[...].reshape((1,) * x.ndim)
        acc = _dense(_to_int8(x, s_x), self.kernel[...], jnp.int32)
        y = acc.astype(jnp.float32) * (s_x * _channels_last(self.scale[...], x.ndim))
        if self.bias is not None:
            y = y + _channels_last(self.bias[...], y.ndim)
        return y


class Int8Conv(nnx.Module):
    """A convolution computing ``int8 x int8 -> int32`` (see the module docstring).

    Build it with :meth:`from_conv`. ``kernel`` holds int8 codes in the
    float layer's layout (``HWIO`` for 2-D), ``scale`` the float32
    per-output-channel scales, ``bias`` the float32 bias or ``None``,
    ``input_scale`` the static activation scale or ``None`` (dynamic: one
    scale per example, i.e. per leading batch element; an input without a
    batch axis is one example). Strides, padding (``'SAME'``, ``'VALID'`` or
    explicit pairs), dilations and feature groups are those of the float
    layer; a pruning ``mask`` of the float layer is applied before
    quantizing.

    Example:
      >>> conv = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
      >>> q = Int8Conv.from_conv(conv)
      >>> q.kernel.shape, q.kernel.dtype, q.scale.shape, q.padding
      ((3, 3, 2, 4), dtype('int8'), (4,), 'SAME')
    """

    def __init__(
        self,
        kernel: jax.Array,
        scale: jax.Array,
        bias: jax.Array | None = None,
        *,
        strides: Sequence[int],
        padding: str | Sequence[Sequence[int]],
        input_dilation: Sequence[int],
        kernel_dilation: Sequence[int],
        feature_group_count: int = 1,
        input_scale: jax.Array | None = None,
    ):
        kernel, scale = jnp.asarray(kernel), jnp.asarray(scale, jnp.float32)
        if kernel.dtype != jnp.int8 or kernel.ndim < 3:
            raise ValueError(
                f"kernel must be an int8 array (*window, in, out); got {kernel.dtype} "
                f"{kernel.shape}"
            )
        if scale.shape != kernel.shape[-1:]:
            raise ValueError(f"scale must have shape {kernel.shape[-1:]}; got {scale.shape}")
        self.rank = kernel.ndim - 2
        self.strides = tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        self.input_dilation = tuple(input_dilation)
        self.kernel_dilation = tuple(kernel_dilation)
        self.groups = int(feature_group_count)
        self.kernel = nnx.Param(kernel)
        self.scale = nnx.Param(scale)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))
        self.input_scale = (
            None if input_scale is None else nnx.Param(jnp.asarray(input_scale, jnp.float32))
        )

    @classmethod
    def from_conv(
        cls, layer: nnx.Conv, *, input_range: Any = None, name: str = "layer"
    ) -> Int8Conv:
        """The int8 twin of ``layer``; ``input_range`` (a positive number) makes it static.

        Raises:
          ValueError: for padding modes other than ``'SAME'``, ``'VALID'`` and
            explicit pairs (``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``).
        """
        _check_layer(layer, nnx.Conv, "layer")
        spec = _ConvSpec(layer, name)
        kernel = layer.kernel[...]
        if layer.mask is not None:
            kernel = kernel * layer.mask
        codes, scale = quantize_weight(kernel)
        bias = layer.bias[...] if layer.use_bias and layer.bias is not None else None
        scale_var = _input_scale(input_range)
        return cls(
            codes,
            scale,
            bias,
            strides=spec.strides,
            padding=spec.padding,
            input_dilation=spec.input_dilation,
            kernel_dilation=spec.kernel_dilation,
            feature_group_count=spec.groups,
            input_scale=None if scale_var is None else scale_var[...],
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(batch..., *spatial, in) -> (batch..., *spatial', out)`` float32."""
        x, batch_shape = _flatten_batch(jnp.asarray(x), self.rank)
        if self.input_scale is None:
            s_x = _row_scale(x, tuple(range(1, x.ndim)))
        else:
            s_x = self.input_scale[...].reshape((1,) * x.ndim)
        codes = _to_int8(x, s_x)
        if _patchable(self):
            acc = _patch_conv(codes, self.kernel[...], self)
        else:
            acc = _conv(codes, self.kernel[...], self, jnp.int32)
        y = acc.astype(jnp.float32) * (s_x * _channels_last(self.scale[...], x.ndim))
        if self.bias is not None:
            y = y + _channels_last(self.bias[...], y.ndim)
        return _restore_batch(y, batch_shape)


class Im2colConv(nnx.Module):
    """A float32 convolution computed as one matrix product over im2col patches.

    The same product as :class:`Int8Conv` (:func:`_patch_conv`: the
    ``prod(window)`` shifted views of the padded input concatenated along
    the channels, contracted with the ``(prod(window) * in, out)`` kernel),
    in float32 on the float layer's weights:

    .. math::
      y_{n,p,o} = \\sum_{k,c} x_{n,\\, s p + d k - \\mathrm{pad},\\, c}\\, W_{k,c,o} + b_o,

    i.e. ``nnx.Conv`` up to the order of the float32 sums. XLA's CPU
    convolution is slow on small images with few channels (on 8x8 digits
    this is 2-12x faster for LeNet-5 and ResNet-20), so
    ``to_int8(..., fallback='measure')`` uses it for a layer that stays in
    float where it measures faster than both XLA's convolution and int8.
    Ungrouped convolutions without input dilation only; the pruning ``mask``
    of the float layer is applied to the kernel.

    Args:
      kernel: float weights ``(*window, in, out)`` (``nnx.Conv``'s layout).
      bias: ``(out,)`` or ``None``.
      strides: one stride per spatial axis.
      padding: ``'SAME'``, ``'VALID'`` or one ``(low, high)`` pair per
        spatial axis.
      kernel_dilation: one dilation per spatial axis.

    Raises:
      ValueError: if ``kernel`` is not floating with at least 3 axes, or
        ``strides``, ``kernel_dilation`` or explicit ``padding`` do not have
        one entry per spatial axis.

    Example:
      >>> conv = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
      >>> fast = Im2colConv.from_conv(conv)
      >>> x = jnp.linspace(-1.0, 1.0, 2 * 5 * 5 * 2).reshape(2, 5, 5, 2)
      >>> bool(jnp.allclose(fast(x), conv(x), atol=1e-5))
      True
    """

    def __init__(
        self,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        strides: Sequence[int],
        padding: str | Sequence[Sequence[int]],
        kernel_dilation: Sequence[int],
    ):
        kernel = jnp.asarray(kernel)
        if not jnp.issubdtype(kernel.dtype, jnp.floating) or kernel.ndim < 3:
            raise ValueError(
                f"kernel must be a floating-point array (*window, in, out); got {kernel.dtype} "
                f"{kernel.shape}"
            )
        self.rank = kernel.ndim - 2
        self.strides = tuple(strides)
        self.padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
        self.kernel_dilation = tuple(kernel_dilation)
        explicit = () if isinstance(padding, str) else (("padding", self.padding),)
        for name, value in (
            ("strides", self.strides),
            ("kernel_dilation", self.kernel_dilation),
            *explicit,
        ):
            if len(value) != self.rank:
                raise ValueError(
                    f"{name} must have one entry per spatial axis ({self.rank} for a kernel of "
                    f"shape {kernel.shape}); got {name}={value!r}"
                )
        self.kernel = nnx.Param(kernel)
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias, kernel.dtype))

    @classmethod
    def from_conv(cls, layer: nnx.Conv, *, name: str = "layer") -> Im2colConv:
        """The im2col twin of ``layer`` (same weights, same result).

        Raises:
          ValueError: for feature groups, input dilation, or padding modes
            other than ``'SAME'``, ``'VALID'`` and explicit pairs.
        """
        _check_layer(layer, nnx.Conv, "layer")
        spec = _ConvSpec(layer, name)
        if not _patchable(spec):
            raise ValueError(
                f"layer {name!r}: im2col needs feature_group_count=1 and no input dilation; got "
                f"feature_group_count={spec.groups}, input_dilation={spec.input_dilation}"
            )
        kernel = layer.kernel[...]
        if layer.mask is not None:
            kernel = kernel * layer.mask
        bias = layer.bias[...] if layer.use_bias and layer.bias is not None else None
        return cls(
            kernel,
            bias,
            strides=spec.strides,
            padding=spec.padding,
            kernel_dilation=spec.kernel_dilation,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(batch..., *spatial, in) -> (batch..., *spatial', out)``."""
        x, batch_shape = _flatten_batch(jnp.asarray(x), self.rank)
        kernel = self.kernel[...]
        y = _patch_conv(x.astype(kernel.dtype), kernel, self, kernel.dtype)
        if self.bias is not None:
            y = y + _channels_last(self.bias[...], y.ndim)
        return _restore_batch(y, batch_shape)


# --------------------------------------------------------------------------- QAT twin


class QuantRange(nnx.Variable):
    """A static activation range of :class:`FakeQuant` (not an ``nnx.Param``: not trained)."""


class FakeQuant(nnx.Module):
    """A float ``nnx.Linear``/``nnx.Conv`` with the int8 layer's fake quantization.

    The forward pass quantizes and dequantizes the input and the kernel with
    :func:`jaxopt_nn.quantization.fake_quant` using exactly the scales and
    rounding of :class:`Int8Linear` / :class:`Int8Conv` (8 bits, symmetric,
    per-output-channel weights, per-row or per-example dynamic inputs, or the
    static ``input_range``), then runs the float product; the gradient is the
    straight-through estimator, so the wrapped layer's ``nnx.Param`` leaves
    train with any optimizer. :func:`to_int8` turns it into the int8 layer.

    Attributes:
      layer: the wrapped float layer (trainable).
      input_range: static activation range, a :class:`QuantRange` float32
        scalar that optimizers over ``nnx.Param`` leave alone, or ``None``
        (dynamic).
    """

    def __init__(
        self, layer: nnx.Linear | nnx.Conv, *, input_range: Any = None, name: str = "layer"
    ):
        if not isinstance(layer, _SUPPORTED):
            raise TypeError(f"layer must be an nnx.Linear or nnx.Conv; got {type(layer).__name__}")
        if isinstance(layer, nnx.Conv):
            _ConvSpec(layer, name)  # refuses unsupported padding now, not when traced
        self.layer = layer
        self.input_range = (
            None
            if input_range is None
            else QuantRange(jnp.asarray(input_range, jnp.float32).reshape(()))
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """The float layer applied to fake-quantized input and kernel."""
        layer = self.layer
        x = jnp.asarray(x).astype(jnp.float32)
        batch_shape = None
        if isinstance(layer, nnx.Conv):
            rank = len(layer.kernel_size)
            x, batch_shape = _flatten_batch(x, rank)
            kept: int | tuple[int, ...] = 0
            kernel = layer.kernel[...]
            if layer.mask is not None:
                kernel = kernel * layer.mask
        else:
            kept, kernel = tuple(range(x.ndim - 1)), layer.kernel[...]
        if self.input_range is None:
            x = fake_quant(x, _BITS, axis=kept, symmetric=True)
        else:
            bound = self.input_range[...]
            x = fake_quant(x, _BITS, symmetric=True, clip=(-bound, bound))
        kernel = fake_quant(kernel, _BITS, axis=kernel.ndim - 1, symmetric=True)
        if isinstance(layer, nnx.Conv):
            y = _conv(x, kernel, _ConvSpec(layer, "layer"), None)
            bias = layer.bias[...] if layer.use_bias and layer.bias is not None else None
        else:
            y = _dense(x, kernel, None)
            bias = None if layer.bias is None else layer.bias[...]
        if bias is not None:
            y = y + _channels_last(bias, y.ndim)
        return _restore_batch(y, batch_shape)


# --------------------------------------------------------------------------- model surgery


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _modules(model: nnx.Module) -> list[tuple[str, tuple, Any]]:
    """``(name, path, module)`` for every module under ``model`` (not ``model`` itself)."""
    found = [
        (_name(path), tuple(path), node)
        for path, node in nnx.iter_graph(model)
        if path and isinstance(node, nnx.Module)
    ]
    return sorted(found, key=lambda item: len(item[1]))  # outermost first


def _get(root: Any, path: tuple) -> Any:
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _set(root: Any, path: tuple, value: Any) -> None:
    parent, key = _get(root, path[:-1]), path[-1]
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _selector(where: Where) -> Callable[[str, Any], bool]:
    if where is None:
        return lambda name, module: isinstance(module, (*_SUPPORTED, FakeQuant))
    if callable(where):
        return where
    if isinstance(where, str) or not isinstance(where, Iterable):
        raise TypeError(
            f"where must be None, a callable (name, module) -> bool or a collection of "
            f"layer names; got where={where!r}"
        )
    names = set(where)
    return lambda name, module: name in names


def _is_layer(module: Any) -> bool:
    """A module without sub-modules, or a :class:`FakeQuant` wrapper."""
    if isinstance(module, FakeQuant):
        return True
    return not any(path and isinstance(node, nnx.Module) for path, node in nnx.iter_graph(module))


def _selected(model: nnx.Module, where: Where) -> list[tuple[str, tuple, Any]]:
    """The chosen layers (outermost first; nothing inside a chosen wrapper), checked."""
    select = _selector(where)
    found, chosen = {}, []
    for name, path, module in _modules(model):
        found[name] = module
        if any(path[: len(p)] == p for _, p, _ in chosen) or not _is_layer(module):
            continue
        if not select(name, module):
            continue
        if not isinstance(module, (*_SUPPORTED, FakeQuant)):
            raise TypeError(
                f"layer {name!r} is an {type(module).__name__}; int8 conversion supports "
                "nnx.Linear and nnx.Conv (and their FakeQuant wrappers)"
            )
        layer = module.layer if isinstance(module, FakeQuant) else module
        if isinstance(layer, nnx.Conv):
            _ConvSpec(layer, name)  # refuses unsupported padding modes
        chosen.append((name, path, module))
    if where is not None and not callable(where):
        missing = sorted(set(where) - set(found))
        if missing:
            raise ValueError(f"where names layers the model lacks: {missing}")
    return chosen


class _Recorder(nnx.Module):
    """Calls ``layer`` and hands its (traced) input to ``record``."""

    def __init__(self, layer: nnx.Module, record: Callable[[jax.Array], None]):
        self.layer = layer
        self.record = record

    def __call__(self, x: jax.Array) -> jax.Array:
        self.record(jnp.asarray(x))
        return self.layer(x)


def _layer_probe(
    model: nnx.Module, chosen: list, reduce: Callable[[jax.Array], Any]
) -> Callable[[jax.Array], dict[str, Any]]:
    """``x -> {name: reduce(input of the layer)}`` for the chosen layers (first call of each).

    Runs a copy of ``model`` in eval mode in which each chosen layer is wrapped
    by a recorder; traceable, so it can be jitted or shape-evaluated.
    """
    probe = nnx.clone(model)
    _eval_mode(probe)
    seen: dict[str, list] = {}
    for name, path, _ in chosen:
        record = functools.partial(lambda name, x: seen.setdefault(name, []).append(x), name)
        _set(probe, path, _Recorder(_get(probe, path), record))
    graphdef, state = nnx.split(probe)

    def run(state: nnx.State, x: jax.Array) -> dict[str, Any]:
        seen.clear()
        nnx.merge(graphdef, state)(x)
        unused = [name for name, _, _ in chosen if name not in seen]
        if unused:
            raise ValueError(f"layers {unused} are not called by the model's forward pass")
        return {name: reduce(seen[name][0]) for name, _, _ in chosen}

    return functools.partial(run, state)


def _eval_mode(model: nnx.Module) -> None:
    if hasattr(model, "eval"):
        model.eval()


def calibrate(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    method: str = "absmax",
    percentile: float = 99.99,
    where: Where = None,
) -> dict[str, jax.Array]:
    """Static activation ranges of the layers :func:`to_int8` will convert.

    Runs ``model`` (a copy, in eval mode, jitted) on ``batches`` and records
    the input range of each chosen layer: the largest ``|x|`` over all
    batches (``'absmax'``), or the ``percentile`` of ``|x|`` in each batch,
    averaged over the batches (``'percentile'``, which clips rare outliers and
    gives the bulk of the values a finer step).

    Args:
      model: the float model (or its :func:`to_qat` twin).
      batches: an iterable of input arrays (or ``(x, y)`` tuples).
      method: ``'absmax'`` or ``'percentile'``.
      percentile: in ``(0, 100]``, used by ``'percentile'``.
      where: the layers (as :func:`to_int8`).

    Returns:
      ``{layer name: float32 range}``, e.g. ``{'fc1': Array(3.2, dtype=float32)}``.

    Raises:
      ValueError: for an unknown ``method``, ``percentile`` out of range, or no batch.
      TypeError: if ``where`` selects a layer that is not supported.

    Example:
      >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> calibrate(model, [jnp.array([[1.0, -4.0]]), jnp.array([[2.0, 0.5]])])
      {'layers/0': Array(4., dtype=float32)}
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}; got method={method!r}")
    if (
        isinstance(percentile, bool)
        or not isinstance(percentile, (int, float))
        or not (0 < percentile <= 100)
    ):
        raise ValueError(f"percentile must be a number in (0, 100]; got percentile={percentile!r}")
    chosen = _selected(model, where)

    def reduce(x: jax.Array) -> jax.Array:
        a = jnp.abs(x.astype(jnp.float32))
        return jnp.max(a) if method == "absmax" else jnp.percentile(a, percentile)

    probe = jax.jit(_layer_probe(model, chosen, reduce))
    per_batch = [probe(jnp.asarray(b[0] if isinstance(b, tuple) else b)) for b in batches]
    if not per_batch:
        raise ValueError("batches must hold at least one batch; got none")
    combine = jnp.max if method == "absmax" else jnp.mean
    return {
        name: combine(jnp.stack([values[name] for values in per_batch])).astype(jnp.float32)
        for name, _, _ in chosen
    }


def _float_layer(module: Any) -> Any:
    return module.layer if isinstance(module, FakeQuant) else module


def _stem_reason(layer: Any) -> str | None:
    """Why a convolution stays float in both modes: too shallow a product (a stem, a 1x1).

    Window x input channels below ``_MIN_DEPTH``: int8 gains little on such a
    product, and on a stem it would quantize the few raw input channels with
    one scale per image, which costs accuracy.
    """
    if not isinstance(layer, nnx.Conv):
        return None
    depth = math.prod(layer.kernel.shape[:-1])
    if depth >= _MIN_DEPTH:
        return None
    return (
        f"window x in = {depth} < {_MIN_DEPTH}: too shallow for int8 to gain, and on a stem "
        "quantizing the few raw input channels costs accuracy"
    )


def _plan_one(layer: Any, rows: int | None) -> str:
    stem = _stem_reason(layer)
    if stem is not None:
        return f"float32 ({stem})"
    if isinstance(layer, nnx.Linear):
        weight = math.prod(layer.kernel.shape)
        if weight < _MIN_WEIGHT:
            return f"float32 (weight {weight:,} < {_MIN_WEIGHT:,} elements)"
    if rows is not None and rows < _MIN_ROWS:
        return f"float32 ({rows} rows per call < {_MIN_ROWS})"
    return "int8"


def _measured_speedup(baseline: nnx.Module, candidate: nnx.Module, x: jax.Array) -> float:
    """Median over paired rounds of ``time(baseline) / time(candidate)`` on ``x``."""
    return compare_latency(
        baseline,
        candidate,
        x,
        repeats=None,
        rounds=_MEASURE_ROUNDS,
        round_seconds=_MEASURE_SECONDS,
    ).speedup


def _measure_one(module: Any, twin: nnx.Module, x: jax.Array, name: str) -> str:
    """The fastest of float32, float32 im2col (convolutions) and int8 for one layer.

    Float32 im2col replaces XLA's convolution when it measures at least
    ``_MEASURE_MARGIN`` times faster; int8 is then timed against the faster
    float layer and kept only if it beats it by the same margin. A stem
    (:func:`_stem_reason`) is never int8.
    """
    layer = _float_layer(module)
    best, kind, notes = layer, "float32", []
    if isinstance(layer, nnx.Conv) and _patchable(_ConvSpec(layer, name)):
        im2col = Im2colConv.from_conv(layer, name=name)
        speedup = _measured_speedup(layer, im2col, x)
        notes.append(f"float32-im2col measured {speedup:.2f}x float32")
        if speedup >= _MEASURE_MARGIN:
            best, kind = im2col, "float32-im2col"
    stem = _stem_reason(layer)
    if stem is not None:
        return f"{kind} ({'; '.join([stem, *notes])})"
    speedup = _measured_speedup(best, twin, x)
    notes.append(f"int8 measured {speedup:.2f}x {kind}")
    if speedup >= _MEASURE_MARGIN:
        return f"int8 ({'; '.join(notes)})"
    return f"{kind} ({'; '.join(notes)}; int8 < {_MEASURE_MARGIN}x)"


def _kind(entry: str) -> str:
    """``'int8'``, ``'float32'`` or ``'float32-im2col'``: the first word of a plan entry."""
    return entry.split(" ", 1)[0]


def int8_plan(
    model: nnx.Module,
    *,
    where: Where = None,
    example: jax.Array | None = None,
    calibration: Mapping[str, Any] | None = None,
    measure: bool = False,
) -> dict[str, str]:
    """Which chosen layers :func:`to_int8` makes int8 and which stay float, and why.

    The rule (from ``benchmarks/integer.py`` on CPUs): the int8 path costs a
    pass over the input (absolute maximum, divide, round) and over the output
    (rescale) on top of the product, so it pays off only for large enough
    products. A dense layer becomes int8 when its weight has at least 16,384
    elements (``K x N``: LeNet-300-100's ``fc3`` of 100 x 10 stays float32);
    a convolution when its window times input channels is at least 64. If
    ``example`` is given, a layer also stays float32 when a call multiplies
    fewer than 16 rows (batch times output pixels: batch-1 dense inference).
    Without ``example`` the row count is unknown and only the weight counts.

    The convolution rule also guards accuracy, so it holds in both modes: a
    stem with few input channels (a 3x3 convolution of 1 channel: ResNet-20's
    first layer; LeNet-5's 5x5 ``conv1`` of 1 channel) quantizes raw pixels
    with one scale per image, which cost ResNet-20 on digits two test images
    when it was converted, and it is too small to gain from int8 anyway.

    With ``measure=True`` the rest of the rule is replaced by a measurement
    on this machine: each layer is jitted alone and run on the input it
    receives when the model is applied to ``example``, with
    :func:`jaxopt_nn.speed.compare_latency` (paired rounds in alternating
    order, each about 3 ms of calls, median of 15 time ratios). A
    convolution that :class:`Im2colConv` can compute is first timed as
    XLA's float32 convolution against float32 im2col, and becomes
    ``'float32-im2col'`` if that is at least 1.05x faster; then int8 (with
    its static range from ``calibration`` if given) is timed against the
    faster float layer and kept only if it is at least 1.05x faster still.
    Measuring costs two to four compilations and a fraction of a second per
    layer, and the decision depends on the machine, the XLA version and the
    load.

    Args:
      model: the float model.
      where: the layers (as :func:`to_int8`).
      example: an input batch of the size you will serve (optional; required
        with ``measure``).
      calibration: static ranges (from :func:`calibrate`) used by ``measure``.
      measure: time each layer instead of applying the size rule.

    Returns:
      ``{layer name: entry}`` for every chosen layer; an entry is ``'int8'``,
      ``'float32 (reason)'``, or with ``measure`` also ``'int8 (ratios)'``
      and ``'float32-im2col (ratios)'``: its first word is what
      :func:`to_int8` builds, the rest says why (the measured ratios).

    Raises:
      ValueError: if ``measure`` is set without ``example``.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> int8_plan(LeNet300100(64, rngs=nnx.Rngs(0)))
      {'fc1': 'int8', 'fc2': 'int8', 'fc3': 'float32 (weight 1,000 < 16,384 elements)'}
    """
    chosen = _selected(model, where)
    if measure:
        if example is None:
            raise ValueError("measure=True needs an example input batch to time the layers on")
        ranges = _check_calibration(calibration, chosen)
        inputs = jax.jit(_layer_probe(model, chosen, lambda x: x))(jnp.asarray(example))
        return {
            name: _measure_one(module, _int8_twin(module, ranges, name), inputs[name], name)
            for name, _, module in chosen
        }
    rows: dict[str, int | None] = {name: None for name, _, _ in chosen}
    if example is not None:
        shapes = jax.eval_shape(_layer_probe(model, chosen, lambda x: x), example)
        for name, _, module in chosen:
            layer = _float_layer(module)
            shape = shapes[name].shape
            if isinstance(layer, nnx.Conv):
                out = jax.eval_shape(layer, jax.ShapeDtypeStruct(shape, jnp.float32)).shape
                rows[name] = math.prod(out[:-1])
            else:
                rows[name] = math.prod(shape[:-1])
    return {name: _plan_one(_float_layer(module), rows[name]) for name, _, module in chosen}


def _check_calibration(calibration: Any, chosen: list) -> dict[str, Any] | None:
    if calibration is None:
        return None
    if not isinstance(calibration, Mapping):
        raise TypeError(
            f"calibration must be None or a mapping from layer name to range (from calibrate); "
            f"got {type(calibration).__name__}"
        )
    names = [name for name, _, _ in chosen]
    missing = sorted(set(names) - set(calibration))
    if missing:
        raise ValueError(
            f"calibration lacks ranges for layers {missing}; it has {sorted(calibration)}"
        )
    for name in names:
        value = np.asarray(calibration[name])
        if value.size != 1 or not np.isfinite(value).all() or float(value) <= 0:
            raise ValueError(
                f"calibration[{name!r}] must be a positive finite number; got {value!r}"
            )
    return dict(calibration)


def to_qat(
    model: nnx.Module, calibration: Mapping[str, Any] | None = None, where: Where = None
) -> nnx.Module:
    """A copy of ``model`` for quantization-aware training that matches :func:`to_int8`.

    Each chosen ``nnx.Linear``/``nnx.Conv`` is wrapped in :class:`FakeQuant`
    (its float weights stay trainable ``nnx.Param`` leaves under
    ``<name>/layer``). After training, ``to_int8(qat_model, ...)`` gives an
    int8 model whose logits equal the QAT model's up to float32 rounding
    (the same codes and scales; only the order of the float sums differs).

    Args:
      model: the float model (not modified).
      calibration: static ranges from :func:`calibrate`, or ``None`` for
        dynamic activation scales.
      where: the layers (as :func:`to_int8`).

    Returns:
      The new model; it shares no variable with ``model``.

    Example:
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> qat = to_qat(model)
      >>> x = jnp.linspace(-2.0, 2.0, 12).reshape(3, 4)
      >>> q = to_int8(qat, fallback=False)
      >>> bool(jnp.allclose(qat(x), q(x), rtol=1e-5, atol=1e-6))
      True
    """
    chosen = _selected(model, where)
    ranges = _check_calibration(calibration, chosen)
    out = nnx.clone(model)
    for name, path, module in chosen:
        if isinstance(module, FakeQuant):
            continue
        layer = _get(out, path)
        bound = None if ranges is None else ranges[name]
        _set(out, path, FakeQuant(layer, input_range=bound, name=name))
    return out


def to_int8(
    model: nnx.Module,
    calibration: Mapping[str, Any] | None = None,
    where: Where = None,
    *,
    fallback: bool | str = True,
    example: jax.Array | None = None,
) -> nnx.Module:
    """A new model whose chosen ``nnx.Linear``/``nnx.Conv`` layers compute in int8.

    Each chosen layer becomes an :class:`Int8Linear` / :class:`Int8Conv`
    (a :class:`FakeQuant` wrapper from :func:`to_qat` becomes the int8 twin of
    its layer, with its static range unless ``calibration`` is given) or,
    where the fallback says so, stays float: the ``nnx.Linear`` /
    ``nnx.Conv`` itself, or an :class:`Im2colConv` where measured faster;
    every other module is copied unchanged. The result shares no variable with
    ``model``, which is left as it was. Fold batch norms first
    (:func:`fold_batchnorm`) so that ResNet convolutions feed no float
    normalisation.

    Args:
      model: the float (or QAT) model.
      calibration: ``None`` for dynamic per-row / per-example activation
        scales, or the static ranges from :func:`calibrate` (one per chosen layer).
      where: ``None`` (every ``nnx.Linear``/``nnx.Conv``), a callable
        ``(name, module) -> bool`` with names such as ``'fc1'`` or
        ``'stages/0/1/conv1'``, or a collection of layer names.
      fallback: ``True``: keep a layer in float32 where int8 would be slower
        by the rule of :func:`int8_plan`; ``'measure'``: build for each layer
        the fastest on ``example`` of float32, :class:`Im2colConv` (float32
        im2col, convolutions) and int8 (``int8_plan(..., measure=True)``;
        a stem with few input channels is never int8); ``False``: convert
        every chosen layer.
      example: an input batch of the serving size, for the fallback rule
        (required by ``'measure'``).

    Returns:
      The converted model (in eval mode if it has batch norms).

    Raises:
      TypeError: if ``where`` selects a module that is not an ``nnx.Linear``
        or ``nnx.Conv``, ``calibration`` is not a mapping or ``fallback`` is
        not ``True``, ``False`` or ``'measure'``.
      ValueError: for a convolution padding other than ``'SAME'``, ``'VALID'``
        or explicit pairs, names the model lacks, or missing / non-positive
        calibration ranges, or ``'measure'`` without ``example``.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> model = LeNet300100(64, rngs=nnx.Rngs(0))
      >>> q = to_int8(model)
      >>> type(q.fc1).__name__, type(q.fc3).__name__, q.fc1.kernel.dtype
      ('Int8Linear', 'Linear', dtype('int8'))
    """
    if fallback not in _FALLBACKS or not isinstance(fallback, (bool, str)):
        raise TypeError(f"fallback must be one of {_FALLBACKS}; got fallback={fallback!r}")
    chosen = _selected(model, where)
    ranges = _check_calibration(calibration, chosen)
    plan = None
    if fallback:
        measure = fallback == "measure"
        plan = int8_plan(
            model, where=where, example=example, calibration=calibration, measure=measure
        )
    out = nnx.clone(model)
    for name, path, _ in chosen:
        module = _get(out, path)
        kind = "int8" if plan is None else _kind(plan[name])
        if kind == "int8":
            _set(out, path, _int8_twin(module, ranges, name))
        elif kind == "float32-im2col":
            _set(out, path, Im2colConv.from_conv(_float_layer(module), name=name))
        else:
            _set(out, path, _float_layer(module))
    _eval_mode(out)
    return out


def _int8_twin(module: Any, ranges: Mapping[str, Any] | None, name: str) -> nnx.Module:
    """The int8 layer of a float layer or :class:`FakeQuant` (``ranges`` first, then its own)."""
    layer, bound = _float_layer(module), None if ranges is None else ranges[name]
    if bound is None and isinstance(module, FakeQuant) and module.input_range is not None:
        bound = module.input_range[...]
    if isinstance(layer, nnx.Linear):
        return Int8Linear.from_linear(layer, input_range=bound)
    return Int8Conv.from_conv(layer, input_range=bound, name=name)


# --------------------------------------------------------------------------- batch-norm folding


class Identity(nnx.Module):
    """``x -> x``: what a batch norm becomes once :func:`fold_batchnorm` folded it."""

    def __call__(self, x: jax.Array, **kwargs: Any) -> jax.Array:
        del kwargs
        return x


def _bn_pairs(model: nnx.Module, pairs: Mapping[str, str] | None) -> list[tuple[tuple, tuple]]:
    modules = {name: (path, module) for name, path, module in _modules(model)}
    if pairs is None:
        pairs = {}
        for name, (path, module) in modules.items():
            key = path[-1]
            if isinstance(module, nnx.BatchNorm) and isinstance(key, str) and "bn" in key:
                pairs[name] = _name((*path[:-1], key.replace("bn", "conv", 1)))
    out = []
    for bn_name, conv_name in pairs.items():
        bn = modules.get(bn_name, (None, None))[1]
        conv = modules.get(conv_name, (None, None))[1]
        if not isinstance(bn, nnx.BatchNorm):
            raise ValueError(f"{bn_name!r} is not an nnx.BatchNorm of the model")
        if not isinstance(conv, nnx.Conv):
            raise ValueError(
                f"batch norm {bn_name!r} has no nnx.Conv {conv_name!r} to fold into; pass "
                "pairs={batch norm name: conv name}"
            )
        if bn.mean.shape != conv.kernel.shape[-1:] or bn.axis not in (-1, conv.kernel.ndim - 1):
            raise ValueError(
                f"batch norm {bn_name!r} (features {bn.mean.shape}, axis {bn.axis}) does not "
                f"normalise the output channels of {conv_name!r} ({conv.kernel.shape[-1]})"
            )
        out.append((modules[bn_name][0], modules[conv_name][0]))
    return out


def fold_batchnorm(model: nnx.Module, pairs: Mapping[str, str] | None = None) -> nnx.Module:
    """A copy of ``model`` with each batch norm folded into the convolution before it.

    With the running statistics (eval mode), ``bn(conv(x))`` equals a
    convolution with

    .. math::
      W'_{\\cdot,o} = W_{\\cdot,o}\\, \\frac{\\gamma_o}{\\sqrt{\\sigma^2_o + \\epsilon}}, \\quad
      b'_o = (b_o - \\mu_o) \\frac{\\gamma_o}{\\sqrt{\\sigma^2_o + \\epsilon}} + \\beta_o

    (computed in float64, stored float32), and the batch norm becomes an
    :class:`Identity`. The result is for inference: it has no batch
    statistics left to train.

    Args:
      model: the model (not modified).
      pairs: ``{batch norm name: conv name}``; default: every ``nnx.BatchNorm``
        whose attribute name contains ``bn`` pairs with the sibling whose name
        has ``conv`` in its place (``bn1 -> conv1``, ``stem_bn -> stem_conv``,
        ``shortcut_bn -> shortcut_conv``: the models of :mod:`jaxopt_nn.models`).
        The pairing must match the forward pass (the conv's output feeds the
        batch norm directly).

    Returns:
      The folded copy.

    Raises:
      ValueError: if a batch norm has no such convolution, or normalises
        another axis or feature count.

    Example:
      >>> from jaxopt_nn.models import ResidualBlock
      >>> block = ResidualBlock(2, 4, rngs=nnx.Rngs(0))
      >>> folded = fold_batchnorm(block)
      >>> type(folded.bn1).__name__, folded.conv1.bias.shape, type(block.bn1).__name__
      ('Identity', (4,), 'BatchNorm')
    """
    found = _bn_pairs(model, pairs)
    out = nnx.clone(model)
    for bn_path, conv_path in found:
        bn, conv = _get(out, bn_path), _get(out, conv_path)
        gamma = (
            np.ones(bn.mean.shape) if bn.scale is None else np.asarray(bn.scale[...], np.float64)
        )
        beta = np.zeros(bn.mean.shape) if bn.bias is None else np.asarray(bn.bias[...], np.float64)
        factor = gamma / np.sqrt(np.asarray(bn.var[...], np.float64) + bn.epsilon)
        kernel = np.asarray(conv.kernel[...], np.float64)
        if conv.mask is not None:
            kernel = kernel * np.asarray(conv.mask)
            conv.mask = None
        bias = np.asarray(conv.bias[...], np.float64) if conv.use_bias else 0.0
        conv.kernel = nnx.Param(jnp.asarray(kernel * factor, jnp.float32))
        bias = (bias - np.asarray(bn.mean[...], np.float64)) * factor + beta
        conv.bias = nnx.Param(jnp.asarray(bias, jnp.float32))
        conv.use_bias = True
        _set(out, bn_path, Identity())
    _eval_mode(out)
    return out
