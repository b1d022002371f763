"""Exact selection of the ``k`` lowest scores, without a sort, and sharding helpers.

The ``k``-th smallest score is found by binary lifting on its float bit
pattern (one counting pass per bit), ties at the threshold by a second lifting
on the flat index (run only when ties straddle it); see the module docstring
of :mod:`jaxopt_nn.pruning` for the contract (exact counts, lower flat index
pruned first). The helpers keep sharded leaves where they are under an
explicit mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P


def _is_number(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _num_pruned(sparsity: Any, size: int) -> Any:
    """``round(sparsity * size)``: a Python int for numbers, int32 array if traced."""
    if _is_number(sparsity):
        return round(float(sparsity) * size)
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def _explicit_spec(x: Any) -> P | None:
    """``x``'s partition spec when it is sharded on a mesh with explicit axes, else None."""
    if not isinstance(x, jax.Array):
        return None
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return None
    return sharding.spec  # type: ignore[union-attr]


def _like(x: jax.Array, ref: Any) -> jax.Array:
    """``x`` resharded like ``ref`` under an explicit mesh (a no-op otherwise)."""
    spec = _explicit_spec(ref)
    if spec is None or _explicit_spec(x) == spec:
        return x
    return jax.sharding.reshard(x, spec)


def _gathered(x: jax.Array) -> jax.Array:
    """``x`` replicated under an explicit mesh, for ops that regroup a sharded axis."""
    return x if _explicit_spec(x) is None else jax.sharding.reshard(x, P())


def _sort_keys(scores: list[jax.Array]) -> list[jax.Array]:
    """Integer keys ordered like the non-negative float ``scores``.

    For non-negative IEEE floats the bit pattern is monotone in the value, so
    a threshold on the keys is a threshold on the scores (NaN ranks highest).
    """
    dtype = jnp.result_type(jnp.float32, *[s.dtype for s in scores])
    ints = jnp.int32 if jnp.dtype(dtype).itemsize == 4 else jnp.int64
    return [jax.lax.bitcast_convert_type(s.astype(dtype), ints) for s in scores]


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
    """Row-major flat index of every entry of ``shape``, plus ``offset`` (int32)."""
    index = jnp.full(shape, offset, jnp.int32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + stride * jax.lax.broadcasted_iota(jnp.int32, shape, dim)
        stride *= shape[dim]
    return index


def _count(flags: jax.Array) -> jax.Array:
    """Number of True entries (int32).

    Row sums go through a float32 matrix-vector product (exact below 2**24
    per row, and several times faster than an integer reduction on CPU); an
    explicitly sharded array is summed directly.
    """
    if flags.ndim == 0 or flags.shape[-1] >= 2**24 or _explicit_spec(flags) is not None:
        return jnp.sum(flags, dtype=jnp.int32)
    rows = jnp.matmul(
        flags.astype(jnp.float32),
        jnp.ones(flags.shape[-1], jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.sum(rows.astype(jnp.int32), dtype=jnp.int32)


def _prune_lowest(
    scores: list[jax.Array],
    sparsities: list[Any],
    scope: str,
    eligible: list[jax.Array] | None = None,
) -> list[jax.Array]:
    """Exactly ``k`` lowest non-negative scores per array (layer) or across all (global).

    No sort: the ``k``-th smallest bit pattern ``T`` is built bit by bit
    (binary lifting: one counting pass per key bit, all arrays in one loop),
    entries below ``T`` are pruned, and of the entries equal to ``T`` the
    first ``k - #below`` in flat order (arrays in list order, then
    row-major). Only when ties straddle the threshold does a second lifting
    over the flat index run. Counting passes are elementwise compares and
    sums, so sharded scores need no gather. With ``eligible`` only eligible
    entries count and ``k`` is capped at their number.
    """
    sizes = [s.size for s in scores]
    if scope == "layer":
        ks = [_num_pruned(sp, n) for sp, n in zip(sparsities, sizes, strict=True)]
    else:
        ks = [_num_pruned(sparsities[0], sum(sizes))]
    ks = jnp.stack([jnp.asarray(k, jnp.int32) for k in ks])
    # Jitted so that eager calls at any sparsity share one compilation.
    return _select_lowest(scores, ks, eligible, scope=scope)


@functools.partial(jax.jit, static_argnames=("scope", "highest"))
def _select_lowest(
    scores: list[jax.Array],
    ks: jax.Array,
    eligible: list[jax.Array] | None,
    *,
    scope: str,
    highest: bool = False,
) -> list[jax.Array]:
    """:func:`_prune_lowest` with the counts ``ks`` (int32, one per group) given.

    With ``highest`` the ``k`` highest scores are chosen (ties: smaller index first).
    """
    keys = _sort_keys(scores)
    dtype = keys[0].dtype
    if highest:
        keys = [jnp.iinfo(dtype).max - kk for kk in keys]
    nbits = 8 * jnp.dtype(dtype).itemsize - 1  # the sign bit of |score| is 0
    sizes = [s.size for s in scores]
    group = list(range(len(keys))) if scope == "layer" else [0] * len(keys)

    def counts(flags: list[jax.Array]) -> jax.Array:
        per = [_count(f) for f in flags]
        return jnp.stack(
            [sum(p for p, g in zip(per, group, strict=True) if g == i) for i in range(len(ks))]
        )

    if eligible is not None:
        keys = [
            jnp.where(e, kk, jnp.iinfo(dtype).max) for kk, e in zip(keys, eligible, strict=True)
        ]
        ks = jnp.minimum(ks, counts(eligible))

    def lift(below: Callable[[jax.Array], list[jax.Array]], target: jax.Array, bits: int, dt):
        """Largest ``r`` in ``[0, 2**bits)`` per group with ``count(below(r)) <= target``."""

        def body(i, r):
            step = jnp.left_shift(jnp.ones((), dt), (bits - 1 - i).astype(dt))
            return jnp.where(counts(below(r + step)) <= target, r + step, r)

        return jax.lax.fori_loop(0, bits, body, jnp.zeros(len(ks), dt))

    # T = smallest key with count(keys <= T) >= k, i.e. largest r with count(keys < r) < k.
    kth = lift(
        lambda r: [kk < r[g] for kk, g in zip(keys, group, strict=True)], ks - 1, nbits, dtype
    )
    kth = jnp.where(ks > 0, kth, -1)  # k = 0: no entry is below or tied
    below = [kk < kth[g] for kk, g in zip(keys, group, strict=True)]
    ties = [kk == kth[g] for kk, g in zip(keys, group, strict=True)]
    need = ks - counts(below)

    def split_ties():
        offsets = np.cumsum([0, *sizes[:-1]]).tolist() if scope == "global" else [0] * len(keys)
        index = [_flat_index(s.shape, o) for s, o in zip(scores, offsets, strict=True)]
        total = max(sum(sizes) if scope == "global" else max(sizes), 1)
        last = lift(
            lambda r: [t & (ix < r[g]) for t, ix, g in zip(ties, index, group, strict=True)],
            need,
            total.bit_length(),
            jnp.int32,
        )
        return [
            b | (t & (ix < last[g])) for b, t, ix, g in zip(below, ties, index, group, strict=True)
        ]

    return jax.lax.cond(
        jnp.all(counts(ties) == need),
        lambda: [b | t for b, t in zip(below, ties, strict=True)],
        split_ties,
    )
