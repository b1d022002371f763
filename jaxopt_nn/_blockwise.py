"""8-bit block-wise quantization of optimizer moments (Dettmers et al. 2021).

A tensor is flattened, zero-padded to a multiple of ``block_size`` and cut
into blocks; each block stores one float32 scale (its absolute maximum divided
by the largest code value) and one byte per element. The bytes hold small
floating-point codes, so the relative error stays roughly constant over many
orders of magnitude inside a block, like the dynamic code of the paper, while
encoding and decoding stay cheap elementwise bit operations (no table search):

* ``signed`` (first moments): sign bit, 4 exponent bits, 3 mantissa bits;
  magnitude code 0 is exactly zero, the others are ``[1.125 * 2**-15, 1.875]
  * scale`` with relative rounding error <= 1/16; magnitudes below
  ``1.0625 * 2**-15 * scale`` flush to zero.
* ``sqrt`` (second moments, non-negative): the square root of the value is
  coded with 4 exponent and 4 mantissa bits and no sign, so ``sqrt(nu)``,
  which is what Adam divides by, has relative error <= 1/32 over
  ``[2**-15, 1.9375] * scale``. Smaller roots round *up* to ``2**-15 * scale``
  (never to zero), which can only shrink an Adam step, never blow it up.

References:
  Dettmers, Lewis, Shleifer, Zettlemoyer, `8-bit Optimizers via Block-wise
  Quantization <https://arxiv.org/abs/2110.02861>`_, 2021 (Sections 2.1-2.2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Code = Literal["signed", "sqrt"]

# (exponent bits, mantissa bits) of the magnitude of each code.
_LAYOUT = {"signed": (4, 3), "sqrt": (4, 4)}


class BlockQuantizedArray(NamedTuple):
    """One tensor stored block-wise in 8 bits (shape and dtype come from the update)."""

    codes: jax.Array  # uint8, shape (n_blocks, block_size); zero-padded tail
    scales: jax.Array  # float32, shape (n_blocks,); block absmax / largest code value


@dataclasses.dataclass(frozen=True)
class BlockQuantization:
    """Settings of the 8-bit block-wise optimizer state.

    Attributes:
      block_size: elements per block, each block has one float32 scale (4
        bytes), so the scales cost ``4 / block_size`` bytes per element (1.6%
        at the default 256). Smaller blocks isolate outliers better (the
        paper's motivation for block-wise over tensor-wise scaling); 256 keeps
        the overhead small while leaving many blocks to parallelise over.
      min_size: tensors with fewer elements stay in floating point (as in the
        paper, which keeps small tensors in 32 bits): biases and norm scales
        are a tiny share of the memory but sensitive to rounding.

    Raises:
      ValueError: if ``block_size < 1`` or ``min_size < 0``.
    """

    block_size: int = 256
    min_size: int = 4096

    def __post_init__(self) -> None:
        for name, low in (("block_size", 1), ("min_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {name}={value!r}")

    def applies_to(self, leaf: jax.Array) -> bool:
        """Whether ``leaf``'s moments are stored in 8 bits (floating, large enough)."""
        return jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and math.prod(
            np.shape(leaf)
        ) >= max(self.min_size, 1)


def _largest(code: Code) -> float:
    return 2.0 - 2.0 ** -_LAYOUT[code][1]


def _magnitude_code(a: jax.Array, code: Code) -> jax.Array:
    """Round ``a >= 0`` (float32) to the nearest code magnitude; int32, unclipped."""
    exponent_bits, mantissa_bits = _LAYOUT[code]
    shift = 23 - mantissa_bits
    bits = jax.lax.bitcast_convert_type(a, jnp.int32)
    # Adding half a unit of the kept mantissa rounds to nearest; a carry moves
    # into the exponent, which is again the nearest code.
    rounded = (bits + (1 << (shift - 1))) >> shift
    return rounded - ((127 - (2**exponent_bits - 1)) << mantissa_bits)


def _magnitude_value(c: jax.Array, code: Code) -> jax.Array:
    """float32 value of magnitude codes ``c`` (int32, within range)."""
    exponent_bits, mantissa_bits = _LAYOUT[code]
    bits = (c + ((127 - (2**exponent_bits - 1)) << mantissa_bits)) << (23 - mantissa_bits)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    flat = x.reshape(-1)
    n_blocks = -(-flat.size // block_size)
    return jnp.pad(flat, (0, n_blocks * block_size - flat.size)).reshape(n_blocks, block_size)


def quantize(x: jax.Array, code: Code, block_size: int) -> BlockQuantizedArray:
    """Store ``x`` block-wise in 8 bits with ``code`` ('signed' or 'sqrt')."""
    blocks = _blocks(x.astype(jnp.float32), block_size)
    if code == "sqrt":
        blocks = jnp.sqrt(blocks)
    magnitude = jnp.abs(blocks)
    absmax = jnp.max(magnitude, axis=1)
    scales = absmax / _largest(code)
    inverse = jnp.where(absmax > 0, _largest(code) / jnp.where(absmax > 0, absmax, 1), 0)
    c = _magnitude_code(magnitude * inverse[:, None], code)
    if code == "sqrt":
        codes = jnp.clip(c, 0, 255)
    else:
        c = jnp.where(c < 1, 0, jnp.minimum(c, 127))
        codes = jnp.where(blocks < 0, c | 128, c)
    return BlockQuantizedArray(codes.astype(jnp.uint8), scales)


def filled(shape: tuple[int, ...], fill: Any, code: Code, block_size: int) -> BlockQuantizedArray:
    """``quantize(jnp.full(shape, fill), code, block_size)`` without a block reduction.

    Every block holds ``fill`` (and padding zeros), so its maximum is ``fill``:
    built directly, nothing for XLA to constant-fold when ``init`` is jitted.
    ``fill`` must be >= 0 (moments start at zero or ``initial_scale``).
    """
    size = math.prod(shape)
    n_blocks = -(-size // block_size)
    fill = jnp.asarray(fill, jnp.float32)
    magnitude = jnp.sqrt(fill) if code == "sqrt" else fill
    scales = jnp.full((n_blocks,), magnitude / _largest(code), jnp.float32)
    largest_code = 255 if code == "sqrt" else 127
    used = jnp.arange(n_blocks * block_size).reshape(n_blocks, block_size) < size
    codes = jnp.where(used & (fill > 0), largest_code, 0).astype(jnp.uint8)
    return BlockQuantizedArray(codes, scales)


def zero_where(q: BlockQuantizedArray, keep: jax.Array) -> BlockQuantizedArray:
    """``q`` with code 0 wherever ``keep`` (the tensor's shape) is False.

    Code 0 is exactly zero in the ``signed`` code and the smallest root,
    ``2**-15 * scale``, in the ``sqrt`` code; the block scales are kept.
    """
    return q._replace(codes=jnp.where(_blocks(keep, q.codes.shape[1]), q.codes, 0))


def dequantize(q: BlockQuantizedArray, code: Code, shape: tuple[int, ...]) -> jax.Array:
    """float32 array of ``shape`` stored in ``q`` with ``code``."""
    c = q.codes.astype(jnp.int32)
    if code == "sqrt":
        root = _magnitude_value(c, code) * q.scales[:, None]
        blocks = root * root
    else:
        magnitude = c & 127
        value = jnp.where(magnitude == 0, 0.0, _magnitude_value(magnitude, code))
        blocks = jnp.where(c >= 128, -value, value) * q.scales[:, None]
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)
