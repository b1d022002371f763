"""Block-wise 8-bit and 4-bit quantization of optimizer moments.

A tensor is cut along its last axis into blocks of ``block_size`` elements
(the last block of a row may be shorter); each block stores one float32 scale
(its absolute maximum divided by the largest code value) and one code per
element: a byte (8 bits) or half a byte (4 bits, two codes per byte along the
last axis). Codes keep the tensor's shape (4 bits: the last axis halved,
rounded up) and scales its leading axes, so both shard like the tensor, and
nothing is flattened, padded or copied: decoding and encoding are elementwise
bit operations that XLA fuses with the optimizer's update.

An optimizer step is compute-bound on CPU once the moments are bytes, so the
block maxima come from one variadic reduction per tensor (:func:`block_maxima`,
several tensors at once), which XLA on CPU emits as one vectorized loop with
the decoding of the old moments fused in; a lone ``max`` would go to a
library kernel that needs its input written out first.

The codes are small floating-point numbers, so the relative error stays
roughly constant over many orders of magnitude inside a block, like the
dynamic code of Dettmers et al., while staying cheap (no table search):

* ``signed`` (first moments): a sign bit and a magnitude with ``e`` exponent
  and ``m`` mantissa bits, (4, 3) in 8 bits, (2, 1) in 4 bits; magnitude code
  0 is exactly zero, magnitudes below half the smallest code flush to zero,
  the others round to the nearest code (relative error <= ``2**-(m + 1)``).
* ``sqrt`` (second moments, non-negative): the square root of the value is
  coded without sign, with (4, 4) bits in 8 bits and (3, 1) in 4 bits, so
  ``sqrt(nu)``, which Adam divides by, has relative error <= ``2**-(m + 1)``.
  The code has no zero (zero-excluding, as Li et al. 2023 recommend for the
  second moment): roots below the smallest code round *up* to it, which can
  only shrink an Adam step, never blow it up.

On CPU the whole step can instead run as one fused pass per block through
JAX's FFI (``jaxopt_nn/_kernels``, :func:`fused_step`): XLA's CPU loop
fusions have one output each, so the XLA path decodes every moment about
three times (block maxima, the encoding of each moment, the update), which
makes the quantized step arithmetic-bound; the kernel decodes once and
rounds exactly as the XLA path does. ``BlockQuantization.kernel`` picks the
path.

References:
  Dettmers, Lewis, Shleifer, Zettlemoyer, `8-bit Optimizers via Block-wise
  Quantization <https://arxiv.org/abs/2110.02861>`_, 2021 (Sections 2.1-2.2).

  Li, Chen, Zhu, `Memory Efficient Optimizers with 4-bit States
  <https://arxiv.org/abs/2309.01507>`_, NeurIPS 2023 (Sections 3-4: block
  size 128, zero-point problem of the second moment).
"""

import dataclasses
import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.sharding import PartitionSpec as P

from jaxopt_nn import _kernels

Code = Literal["signed", "sqrt"]
Kernel = Literal["auto", "xla", "cpu"]

# (exponent bits, mantissa bits) of the magnitude of each code, per bit width.
_LAYOUT = {
    ("signed", 8): (4, 3),
    ("sqrt", 8): (4, 4),
    ("signed", 4): (2, 1),
    ("sqrt", 4): (3, 1),
}
_DEFAULT_BLOCK = {8: 256, 4: 128}


class BlockQuantizedArray(NamedTuple):
    """One tensor of shape ``(..., n)`` stored block-wise in 8 or 4 bits."""

    codes: jax.Array  # uint8, (..., n) in 8 bits, (..., ceil(n / 2)) in 4 bits
    scales: jax.Array  # float32, (..., ceil(n / block_size)); block absmax / largest code


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockQuantization:
    """Settings of the block-wise quantized optimizer state.

    Attributes:
      bits: bits per code, 8 (Dettmers et al. 2021) or 4 (Li et al. 2023;
        two codes per byte).
      block_size: elements per block along the last axis, each block with one
        float32 scale (4 bytes); ``None`` picks 256 for 8 bits (1.6%
        overhead) and 128 for 4 bits (3.1%), the papers' choices. Smaller
        blocks isolate outliers better; a last axis shorter than the block
        makes shorter blocks (and a larger overhead).
      min_size: tensors with fewer elements stay in floating point (as in the
        papers): biases and norm scales are a tiny share of the memory but
        sensitive to rounding.
      kernel: how the step runs. ``'xla'``: jax.numpy code that XLA fuses,
        on any backend, sharded or not, differentiable. ``'cpu'``: one fused
        pass per block in a C++ kernel called through JAX's FFI (compiled on
        first use with the system C++ compiler, cached per user), for
        float32 gradients on the CPU backend; about twice as fast on CPU.
        Raises :class:`jaxopt_nn._kernels.KernelUnavailableError` if it
        cannot be built. The kernel has no sharding rule (a sharded operand
        is gathered); under ``jax.grad`` or ``jax.jvp`` the step runs on the
        XLA path, whose derivatives it has. ``'auto'`` (default): the kernel
        where it applies (CPU backend, one device, float32 gradient, no
        explicit sharding, the kernel builds), the XLA path everywhere else;
        both give the same codes (see ``jaxopt_nn/_kernels/README.md``).

    Raises:
      ValueError: if ``bits`` is not 4 or 8, ``block_size < 1`` (or odd with
        4 bits), ``min_size < 0`` or ``kernel`` is not 'auto', 'xla' or 'cpu'.
    """

    bits: int = 8
    block_size: int | None = None
    min_size: int = 4096
    kernel: Kernel = "auto"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be 4 or 8; got bits={self.bits!r}")
        if self.block_size is None:
            object.__setattr__(self, "block_size", _DEFAULT_BLOCK[self.bits])
        for name, low in (("block_size", 1), ("min_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {name}={value!r}")
        if self.bits == 4 and self.block_size % 2:  # type: ignore[operator]
            raise ValueError(
                f"block_size must be even with bits=4 (two codes per byte); "
                f"got block_size={self.block_size}"
            )
        if self.kernel not in ("auto", "xla", "cpu"):
            raise ValueError(f"kernel must be 'auto', 'xla' or 'cpu'; got kernel={self.kernel!r}")

    def applies_to(self, leaf: Any) -> bool:
        """Whether ``leaf``'s moments are stored quantized (real floating, large enough)."""
        return jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and math.prod(
            np.shape(leaf)
        ) >= max(self.min_size, 1)


def _largest(code: Code, bits: int) -> float:
    return 2.0 - 2.0 ** -_LAYOUT[code, bits][1]


def _top_code(code: Code, bits: int) -> int:
    """The code of the largest magnitude."""
    return 2 ** (bits - 1) - 1 if code == "signed" else 2**bits - 1


def _magnitude_code(a: jax.Array, code: Code, bits: int) -> jax.Array:
    """Round ``a >= 0`` (float32) to the nearest code magnitude; int32, unclipped."""
    exponent_bits, mantissa_bits = _LAYOUT[code, bits]
    shift = 23 - mantissa_bits
    raw = jax.lax.bitcast_convert_type(a, jnp.int32)
    # Adding half a unit of the kept mantissa rounds to nearest; a carry moves
    # into the exponent, which is again the nearest code.
    rounded = (raw + (1 << (shift - 1))) >> shift
    return rounded - ((127 - (2**exponent_bits - 1)) << mantissa_bits)


def _magnitude_value(c: jax.Array, code: Code, bits: int) -> jax.Array:
    """float32 value of magnitude codes ``c`` (int32, within range)."""
    exponent_bits, mantissa_bits = _LAYOUT[code, bits]
    raw = (c + ((127 - (2**exponent_bits - 1)) << mantissa_bits)) << (23 - mantissa_bits)
    return jax.lax.bitcast_convert_type(raw, jnp.float32)


def _rows(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor is coded in: scalars become one element of one row."""
    return shape if shape else (1,)


def _n_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def _per_element(scales: jax.Array, n: int, block_size: int) -> jax.Array:
    """Each element's block scale: ``scales`` repeated along the last axis to length ``n``.

    A broadcast and a reshape, which XLA fuses into the consumer (``jnp.repeat``
    would be a gather).
    """
    *lead, n_blocks = scales.shape
    if n_blocks == 1:
        return scales
    wide = jax.lax.broadcast_in_dim(
        scales, (*lead, n_blocks, block_size), tuple(range(len(lead) + 1))
    )
    return wide.reshape(*lead, n_blocks * block_size)[..., :n]


def _block_extrema(xs: list[jax.Array], block_size: int) -> list[jax.Array]:
    """Maximum and minimum of each of ``xs`` (float32, one shape) over blocks of the last axis.

    One variadic reduction, which XLA on CPU emits as one vectorized loop with
    the producers of ``xs`` fused in: they are computed once and never
    written out (a lone ``max`` would go to a library kernel that needs its
    input in memory). Each block is reduced as ``(width / 2, 2)`` pairs, so a
    byte of 4-bit codes is unpacked once for its two elements, not through
    a division of each element's index. Rows that the blocks do not tile are
    padded with zeros inside that loop, which moves neither extremum past zero.
    """
    *lead, n = xs[0].shape
    n_blocks = _n_blocks(n, block_size)
    width = n if n_blocks == 1 else block_size
    if n_blocks * width != n:
        xs = [jnp.pad(x, [(0, 0)] * len(lead) + [(0, n_blocks * width - n)]) for x in xs]
    pairs = 2 if width % 2 == 0 else 1
    blocks = [x.reshape(*lead, n_blocks, width // pairs, pairs) for x in xs]
    inf = jnp.float32(jnp.inf)

    def reducer(a: Any, b: Any) -> tuple[jax.Array, ...]:
        return tuple(
            (jnp.maximum if i % 2 == 0 else jnp.minimum)(x, y)
            for i, (x, y) in enumerate(zip(a, b, strict=True))
        )

    extrema = jax.lax.reduce(
        tuple(b for b in blocks for _ in range(2)),
        tuple(init for _ in blocks for init in (-inf, inf)),
        reducer,
        (len(lead) + 1, len(lead) + 2),
    )
    return list(extrema)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _differentiable_block_extrema(xs: list[jax.Array], block_size: int) -> list[jax.Array]:
    """:func:`_block_extrema`, whose JVP gets every tangent as an array.

    JAX's JVP of a variadic ``lax.reduce`` fails on a symbolic zero tangent
    (one of ``xs`` that does not depend on the differentiated input, such as
    the second moment under a derivative with respect to ``b1``); a
    ``custom_jvp`` instantiates those zeros first.
    """
    return _block_extrema(xs, block_size)


@_differentiable_block_extrema.defjvp
def _block_extrema_jvp(
    block_size: int, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Any, Any]:
    return jax.jvp(functools.partial(_block_extrema, block_size=block_size), primals, tangents)


def _block_maxima(xs: list[jax.Array], codes: list[Code], block_size: int) -> list[jax.Array]:
    xs = [jnp.asarray(x, jnp.float32).reshape(_rows(np.shape(x))) for x in xs]
    extrema = _differentiable_block_extrema(xs, block_size)
    maxima = []
    for i, code in enumerate(codes):
        high, low = extrema[2 * i], extrema[2 * i + 1]
        # sqrt is monotone and correctly rounded: the largest root is the root
        # of the largest value, one square root per block instead of per element.
        maxima.append(jnp.sqrt(high) if code == "sqrt" else jnp.maximum(high, -low))
    return maxima


def block_maxima(
    xs: list[jax.Array], codes: list[Code], quantization: BlockQuantization
) -> list[jax.Array]:
    """Each block's largest magnitude of each of ``xs`` (one shape), in one reduction.

    The magnitude is ``|x|`` for the 'signed' code and ``sqrt(x)`` for the
    'sqrt' code (``x >= 0``); the results are float32, shaped like the
    scales, for :func:`quantize`'s ``absmax``. Several tensors of one shape
    (Adam's two moments) share one pass, in which XLA computes them from
    their producers (the decoded old moments and the gradient) without
    writing them out.
    """
    assert quantization.block_size is not None
    shape = tuple(_quantized_shapes(np.shape(xs[0]), quantization).scales)
    fn = functools.partial(_block_maxima, codes=list(codes), block_size=quantization.block_size)
    return _like(xs[0], [shape] * len(xs), fn, list(xs))


def _pack(c: jax.Array, bits: int) -> jax.Array:
    """uint8 codes: one per byte (8 bits) or two per byte along the last axis (4 bits)."""
    c = c.astype(jnp.uint8)
    if bits == 8:
        return c
    if c.shape[-1] % 2:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, 1)])
    # Each pair of bytes read as one little-endian uint16: (first, second)
    # -> first | second << 4 with shifts and masks on a contiguous load.
    pairs = jax.lax.bitcast_convert_type(c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2), jnp.uint16)
    return ((pairs & 0x0F) | ((pairs >> 4) & 0xF0)).astype(jnp.uint8)


def _unpack(codes: jax.Array, n: int, bits: int) -> jax.Array:
    """int32 codes of the ``n`` elements of each row (inverse of :func:`_pack`)."""
    c = codes.astype(jnp.int32)
    if bits == 8:
        return c
    # Broadcast each byte to its two codes and shift by 0 or 4: elementwise
    # index arithmetic that XLA fuses into the consumer.
    shape = (*c.shape, 2)
    wide = jax.lax.broadcast_in_dim(c, shape, tuple(range(c.ndim)))
    pairs = (wide >> (4 * jax.lax.broadcasted_iota(jnp.int32, shape, c.ndim))) & 15
    return pairs.reshape(*c.shape[:-1], 2 * c.shape[-1])[..., :n]


def _encode(
    x: jax.Array, absmax: jax.Array | None, code: Code, quantization: BlockQuantization
) -> tuple[jax.Array, jax.Array]:
    """One uint8 code per element of ``x`` (rows, float32) and the block scales."""
    bits, block_size = quantization.bits, quantization.block_size
    assert block_size is not None
    if absmax is None:
        (absmax,) = _block_maxima([x], [code], block_size)
    magnitude = jnp.sqrt(x) if code == "sqrt" else jnp.abs(x)
    largest = _largest(code, bits)
    scales = absmax / largest
    inverse = jnp.where(absmax > 0, largest / jnp.where(absmax > 0, absmax, 1), 0)
    # Computed once per block: XLA would otherwise fuse this into the
    # elementwise loop and redo it (a division and selects) every 8 elements.
    inverse = jax.lax.optimization_barrier(inverse)
    c = _magnitude_code(magnitude * _per_element(inverse, x.shape[-1], block_size), code, bits)
    top = _top_code(code, bits)
    c = jnp.clip(c, 0, top)  # magnitudes below half the smallest code: 0
    if code == "signed":
        c = jnp.where(x < 0, c | (top + 1), c)
    return c.astype(jnp.uint8), scales


def _quantize(
    x: jax.Array, absmax: jax.Array | None, code: Code, quantization: BlockQuantization
) -> BlockQuantizedArray:
    x = x.astype(jnp.float32).reshape(_rows(np.shape(x)))
    c, scales = _encode(x, absmax, code, quantization)
    return BlockQuantizedArray(_pack(c, quantization.bits), scales)


def stored_absmax(q: BlockQuantizedArray, code: Code, quantization: BlockQuantization) -> jax.Array:
    """The largest magnitude each block of ``q`` can hold (of the root, for 'sqrt')."""
    return q.scales * _largest(code, quantization.bits)


def _dequantize(
    q: BlockQuantizedArray, code: Code, shape: tuple[int, ...], quantization: BlockQuantization
) -> jax.Array:
    bits, block_size = quantization.bits, quantization.block_size
    assert block_size is not None
    n = _rows(shape)[-1]
    c = _unpack(q.codes, n, bits)
    scale = _per_element(q.scales, n, block_size)
    if code == "sqrt":
        root = _magnitude_value(c, code, bits) * scale
        value = root * root
    else:
        top = _top_code(code, bits)
        magnitude = c & top
        value = jnp.where(magnitude == 0, 0.0, _magnitude_value(magnitude, code, bits))
        value = jnp.where(c > top, -value, value) * scale
    return value.reshape(shape)


def _quantized_shapes(
    shape: tuple[int, ...], quantization: BlockQuantization
) -> BlockQuantizedArray:
    """The shapes of the codes and the scales of a tensor of ``shape``."""
    assert quantization.block_size is not None
    *lead, n = _rows(shape)
    codes = n if quantization.bits == 8 else _n_blocks(n, 2)
    return BlockQuantizedArray((*lead, codes), (*lead, _n_blocks(n, quantization.block_size)))  # type: ignore[arg-type]


def _fit(spec: P, shape: tuple[int, ...], mesh_shape: Any) -> P:
    """``spec`` for an array of ``shape``; axes the mesh does not divide stay unsharded."""
    entries = (list(spec) + [None] * len(shape))[: len(shape)]
    for i, entry in enumerate(entries):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        if shape[i] % math.prod(mesh_shape[name] for name in names):
            entries[i] = None
    return P(*entries)


def _explicit_sharding(x: Any) -> Any:
    """The sharding in ``x``'s type if an axis is explicitly sharded, else None."""
    if not isinstance(x, jax.Array):
        return None
    sharding = jax.typeof(x).sharding
    spec = getattr(sharding, "spec", ())
    return sharding if any(entry is not None for entry in spec) else None


def _like(x: Any, shapes: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` (arrays only), its outputs (of ``shapes``) sharded like ``x`` (explicit mesh).

    Reshapes into blocks, packing and the repeat of the scales are not
    expressible on explicitly sharded axes, so they run with the axes made
    automatic (``jax.sharding.auto_axes``) and the results take the sharding
    of ``x`` on every axis whose length the mesh divides.
    """
    sharding = _explicit_sharding(x)
    if sharding is None:
        return fn(*args)
    out = jax.tree.map(
        lambda shape: _fit(sharding.spec, shape, sharding.mesh.shape),
        shapes,
        is_leaf=lambda s: isinstance(s, tuple) and not isinstance(s, BlockQuantizedArray),
    )
    return jax.sharding.auto_axes(fn, out_sharding=out)(*args)


def quantize(
    x: jax.Array,
    code: Code,
    quantization: BlockQuantization,
    absmax: jax.Array | None = None,
) -> BlockQuantizedArray:
    """Store ``x`` block-wise with ``code`` ('signed' or 'sqrt') as ``quantization`` says.

    Args:
      x: the tensor (``x >= 0`` for the 'sqrt' code).
      code: 'signed' or 'sqrt'.
      quantization: bit width and block size.
      absmax: each block's largest magnitude (of ``sqrt(x)`` for the 'sqrt'
        code), shaped like the scales, from :func:`block_maxima`, or an
        upper bound of it; ``None`` computes it here. Magnitudes above it are
        clipped to the largest code.

    Returns:
      The :class:`BlockQuantizedArray`.
    """
    shapes = _quantized_shapes(np.shape(x), quantization)
    fn = functools.partial(_quantize, code=code, quantization=quantization)
    return _like(x, shapes, fn, x, absmax)


def dequantize(
    q: BlockQuantizedArray, code: Code, shape: tuple[int, ...], quantization: BlockQuantization
) -> jax.Array:
    """float32 array of ``shape`` stored in ``q`` with ``code``."""
    fn = functools.partial(_dequantize, code=code, shape=tuple(shape), quantization=quantization)
    return _like(q.codes, tuple(shape), fn, q)


def filled(
    like: Any, fill: Any, code: Code, quantization: BlockQuantization
) -> BlockQuantizedArray:
    """``quantize(jnp.full_like(like, fill), code, quantization)`` without a block reduction.

    Every block holds ``fill``, so its maximum is ``fill``: built directly,
    nothing for XLA to constant-fold when ``init`` is jitted. ``fill`` must be
    >= 0 (moments start at zero or ``initial_scale``). ``like`` (an array or
    a ``jax.ShapeDtypeStruct``) gives the shape, and under an explicit mesh
    the sharding.
    """
    bits, block_size = quantization.bits, quantization.block_size
    assert block_size is not None
    rows = _rows(np.shape(like))
    fill = jnp.asarray(fill, jnp.float32)
    magnitude = jnp.sqrt(fill) if code == "sqrt" else fill
    scales = jnp.broadcast_to(
        magnitude / _largest(code, bits), (*rows[:-1], _n_blocks(rows[-1], block_size))
    )
    c = jnp.broadcast_to(jnp.where(fill > 0, _top_code(code, bits), 0), rows)
    q = BlockQuantizedArray(_pack(c, bits), scales)
    sharding = _explicit_sharding(like)
    if sharding is None:
        return q
    shapes = _quantized_shapes(np.shape(like), quantization)
    specs = [_fit(sharding.spec, tuple(map(int, shape)), sharding.mesh.shape) for shape in shapes]
    return BlockQuantizedArray(*jax.sharding.reshard(tuple(q), tuple(specs)))


def zero_where(q: BlockQuantizedArray, keep: jax.Array) -> BlockQuantizedArray:
    """``q`` with code 0 wherever ``keep`` (the tensor's shape) is False.

    Code 0 is exactly zero in the ``signed`` code and the smallest root in the
    ``sqrt`` code; the block scales are kept. The bit width is read from the
    codes' last axis (``n`` codes: 8 bits, ``ceil(n / 2)``: 4 bits); for
    ``n = 1`` both read the same, as the unused half-byte of 4 bits is zero.
    """

    def zero(codes: jax.Array, keep: jax.Array) -> jax.Array:
        keep = keep.reshape(_rows(np.shape(keep)))
        n = keep.shape[-1]
        bits = 8 if codes.shape[-1] == n else 4
        c = jnp.where(keep, _unpack(codes, n, bits), 0)
        return _pack(c, bits).reshape(codes.shape)

    keep = jnp.asarray(keep)
    return q._replace(codes=_like(keep, tuple(q.codes.shape), zero, q.codes, keep))


def _on_several_devices(x: Any) -> bool:
    """Whether ``x`` is a concrete array spread over more than one device."""
    if isinstance(x, Tracer) or not isinstance(x, jax.Array):
        return False
    return len(x.sharding.device_set) > 1


def uses_kernel(quantization: BlockQuantization, g: Any) -> bool:
    """Whether the step of a leaf with gradient ``g`` runs in the fused CPU kernel.

    ``kernel='xla'``: never. Otherwise only for a float32 gradient that is
    neither explicitly sharded nor a concrete array on several devices;
    ``'cpu'`` then requires the CPU backend and a kernel that builds (else it
    raises), ``'auto'`` takes the kernel only on the CPU backend with one
    device and when it builds.

    Raises:
      ValueError: ``kernel='cpu'`` on another backend.
      jaxopt_nn._kernels.KernelUnavailableError: ``kernel='cpu'`` and the
        kernel cannot be built.
    """
    if quantization.kernel == "xla" or jnp.result_type(g) != jnp.float32:
        return False
    if _explicit_sharding(g) is not None or _on_several_devices(g):
        return False
    backend = jax.default_backend()
    if quantization.kernel == "cpu":
        if backend != "cpu":
            raise ValueError(
                f"kernel='cpu' needs the CPU backend; got backend {backend!r} "
                "(use kernel='auto' or 'xla')"
            )
        _kernels.require()
        return True
    return backend == "cpu" and jax.device_count() == 1 and _kernels.available()


def with_xla_derivative(kernel_fn: Any, xla_fn: Any) -> Any:
    """``kernel_fn``, differentiated (``jax.jvp``, ``jax.grad``) as ``xla_fn``.

    The FFI call has no derivative rule; ``xla_fn`` computes the same values
    with jax.numpy (the same codes and scales, the update up to its last
    bit), so under differentiation the step runs on the XLA path and has its
    derivatives; otherwise it runs in the kernel. Python numbers among the
    arguments reach both functions unchanged (bound, not traced as float32
    arrays, which would round ``1 - b1`` differently).

    Args:
      kernel_fn: one leaf's step through :func:`fused_step`.
      xla_fn: the same step on the XLA path, with the same signature. Every
        traced value it depends on (hyperparameters included) must be an
        argument: values it closes over get no derivative.

    Returns:
      A function with ``kernel_fn``'s signature.
    """

    def call(*args: Any) -> Any:
        static = [isinstance(a, (int, float)) for a in args]

        def bind(fn: Any) -> Any:
            def bound(*traced: Any) -> Any:
                rest = iter(traced)
                return fn(*(a if s else next(rest) for a, s in zip(args, static, strict=True)))

            return bound

        fn = jax.custom_jvp(bind(kernel_fn))
        fn.defjvp(lambda primals, tangents: jax.jvp(bind(xla_fn), primals, tangents))
        return fn(*(a for a, s in zip(args, static, strict=True) if not s))

    return call


def fused_step(
    g: jax.Array,
    moments: list[BlockQuantizedArray],
    hyper: jax.Array,
    quantization: BlockQuantization,
    mode: str,
) -> tuple[jax.Array, list[BlockQuantizedArray]]:
    """The update and the new moments of one leaf from the fused CPU kernel.

    Args:
      g: the float32 gradient.
      moments: Adam's first ('signed') and second ('sqrt') moment, or
        RMSprop's second moment, stored as :func:`quantize` stores them.
      hyper: float32 hyperparameters, ``(9,)`` for Adam, ``(4,)`` for
        RMSprop, in the order ``jaxopt_nn/_kernels/blockwise_adam.cc`` reads.
      quantization: bit width and block size of ``moments``.
      mode: 'adam', 'nadam', 'rms_eps_in_sqrt' or 'rms_eps_outside'.

    Returns:
      The update (``g``'s shape) and the new moments, with the codes and
      scales the XLA path computes (the update may differ from it in the
      last bit where XLA evaluates a reciprocal square root differently).
    """
    assert quantization.block_size is not None
    shape = np.shape(g)
    target = "jaxopt_nn_blockwise_" + ("adam" if mode in ("adam", "nadam") else "rms")
    update, new = _kernels.step(
        target,
        jnp.reshape(g, _rows(shape)),
        [(q.codes, q.scales) for q in moments],
        hyper,
        bits=quantization.bits,
        block_size=quantization.block_size,
        mode=mode,
    )
    return update.reshape(shape), [BlockQuantizedArray(*pair) for pair in new]
