"""Quantization: uniform affine, fake-quant with STE, k-means weight sharing."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Codebook(NamedTuple):
    """Shared weights of one tensor (Deep Compression weight sharing).

    The weight is rebuilt as ``where(mask, centroids[indices], 0)``.
    """

    centroids: jax.Array  # float32, shape (k,), k <= 2**bits
    indices: jax.Array  # uint8 (bits <= 8) or uint16, shape of the weight; 0 where pruned
    mask: jax.Array  # bool, shape of the weight; True where the weight is kept


def codebook_weights(codebook: Codebook, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The dense weight a codebook stands for: ``where(mask, centroids[indices], 0)``."""
    values = jnp.take(codebook.centroids, codebook.indices.astype(jnp.int32))
    return jnp.where(codebook.mask, values, 0).astype(dtype)
