"""Exact selection of the ``k`` lowest scores, without a sort, and sharding helpers.

The ``k``-th smallest score is found by binary lifting on its float bit
pattern, ties at the threshold by a second lifting on the flat index (run only
when ties straddle it). A counting pass fixes two bits (three thresholds
counted by one matrix-vector product, see :func:`_counts_below`), or one bit
for arrays sharded under an explicit mesh; see the module docstring
of :mod:`jaxopt_nn.pruning` for the contract (exact counts, lower flat index
pruned first). The helpers keep sharded leaves where they are under an
explicit mesh.
"""

from __future__ import annotations

import functools
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
    """Unsigned integer keys ordered like the non-negative float ``scores``.

    For non-negative IEEE floats the bit pattern is monotone in the value, so
    a threshold on the keys is a threshold on the scores (NaN ranks highest).
    The sign bit is 0, so every key lies below half the dtype's maximum.
    """
    dtype = jnp.result_type(jnp.float32, *[s.dtype for s in scores])
    ints = jnp.uint32 if jnp.dtype(dtype).itemsize == 4 else jnp.uint64
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

    No sort: the ``k``-th smallest bit pattern ``T`` is built from the top
    (binary lifting: one counting pass per two key bits, all arrays in one loop),
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


# A counting pass packs the flags of three thresholds into the base-256 digits of
# one float32 per entry; a row's sum holds the three row counts as its digits.
_DIGIT = 256
_MAX_ROW = _DIGIT - 1  # 255 * (1 + 256 + 256**2) = 2**24 - 1: row sums stay exact
_MIN_ROW = 16  # shorter rows are counted one threshold at a time
_FOLD = 2  # the two halves of an array are added before the product (fewer bytes)


def _longest_row(size: int, most: int) -> int:
    """The largest divisor of ``size`` up to ``most`` (1 for ``size`` 0)."""
    return max((d for d in range(1, min(size, most) + 1) if size % d == 0), default=1)


def _layout(size: int) -> tuple[int, int, int]:
    """``(folds, rows, row)``: ``size`` entries as two halves of rows, else as rows, to count.

    The longest rows with ``folds * row <= 255``; halves when their rows reach
    16 entries.
    """
    row = _longest_row(size // _FOLD, _MAX_ROW // _FOLD)
    if size % _FOLD == 0 and row >= _MIN_ROW:
        return _FOLD, size // _FOLD // row, row
    row = _longest_row(size, _MAX_ROW)
    return 1, size // row, row


def _counts_below(values: jax.Array, thresholds: jax.Array) -> jax.Array:
    """``count(values < t)`` for each of the at most three ascending ``thresholds`` (int32).

    ``values`` laid out as ``(folds, rows, row)`` (:func:`_layout`) with
    ``16 <= row`` and ``folds * row <= 255``: the flags of threshold ``j`` form
    the base-256 digit ``j`` of one float32 per entry (nested selects, as the
    thresholds ascend), the folds are added, and a matrix-vector product sums
    each row's three counts at once (each digit at most ``folds * row <= 255``,
    so the sum stays below ``2**24``: exact). Any other array is counted one
    threshold at a time by :func:`_count`.
    """
    packable = (
        values.ndim == 3
        and values.shape[-1] >= _MIN_ROW
        and values.shape[0] * values.shape[-1] <= _MAX_ROW
        and _explicit_spec(values) is None
    )
    if not packable:
        return jnp.stack([_count(values < t) for t in thresholds])
    folds, _, row = values.shape
    count = thresholds.shape[0]
    packed = jnp.zeros(values.shape, jnp.float32)
    for j in reversed(range(count)):  # below t_j means below every later threshold too
        packed = jnp.where(
            values < thresholds[j], float(sum(_DIGIT**i for i in range(j, count))), packed
        )
    folded = sum(packed[f] for f in range(folds))
    sums = jnp.matmul(
        folded, jnp.ones(row, jnp.float32), precision=jax.lax.Precision.HIGHEST
    ).astype(jnp.int32)
    return jnp.stack(
        [
            jnp.sum(jnp.right_shift(sums, 8 * j) & (_DIGIT - 1), dtype=jnp.int32)
            for j in range(count)
        ]
    )


def _lift(
    values: list[jax.Array], group: list[int], target: jax.Array, width: int, ways: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per group, the largest ``r`` in ``[0, 2**width)`` with ``count(values < r) <= target``.

    Binary lifting in base ``ways`` (2 or 4): the digits of ``r`` are fixed from
    the top, one counting pass (``ways - 1`` thresholds) per digit.

    Args:
      values: unsigned integer arrays, one dtype, as laid out for counting.
      group: the group of each array.
      target: int32, shape ``(groups,)``.
      width: bits of ``r``; at most the bits of the values' dtype.
      ways: 2, or 4 (three thresholds per pass, see :func:`_counts_below`).

    Returns:
      ``r`` (the values' dtype), ``count(values < r)`` and ``count(values < r + 1)``
      (int32), each of shape ``(groups,)``. The last is exact only when
      ``width`` is the dtype's bit width (it starts as the group's size).
    """
    dtype = values[0].dtype
    shift = ways.bit_length() - 1
    steps = -(-width // shift)
    ngroups = target.shape[0]
    sizes = [
        sum(v.size for v, g in zip(values, group, strict=True) if g == n) for n in range(ngroups)
    ]

    def body(i, carry):
        r, below, upto = carry
        step = jnp.left_shift(jnp.ones((), dtype), (shift * (steps - 1 - i)).astype(dtype))
        thresholds = r[:, None] + (step * jnp.arange(1, ways, dtype=dtype))[None, :]
        per = [_counts_below(v, thresholds[g]) for v, g in zip(values, group, strict=True)]
        counts = jnp.stack(
            [sum(p for p, g in zip(per, group, strict=True) if g == n) for n in range(ngroups)]
        )  # (groups, ways - 1): count(values < r + j * step), j = 1 .. ways - 1
        fits = counts <= target[:, None]  # a prefix: counts grow with j
        below = jnp.maximum(below, jnp.max(jnp.where(fits, counts, 0), axis=1))
        upto = jnp.minimum(upto, jnp.min(jnp.where(fits, upto[:, None], counts), axis=1))
        return r + step * jnp.sum(fits, axis=1, dtype=dtype), below, upto

    init = (
        jnp.zeros(ngroups, dtype),
        jnp.zeros(ngroups, jnp.int32),
        jnp.asarray(sizes, jnp.int32),
    )
    return jax.lax.fori_loop(0, steps, body, init)


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
    Without an explicit mesh each key array is viewed as ``(folds, rows, row)``
    (:func:`_layout`, a free reshape) and every counting pass fixes two bits
    of the threshold (:func:`_counts_below`); sharded arrays keep their shape
    and one bit per pass.
    """
    keys = _sort_keys(scores)
    dtype = keys[0].dtype
    top = jnp.asarray(jnp.iinfo(dtype).max, dtype)  # above every score's key (sign bit 0)
    if highest:
        keys = [jnp.right_shift(top, jnp.ones((), dtype)) - kk for kk in keys]
    if eligible is not None:
        keys = [jnp.where(e, kk, top) for kk, e in zip(keys, eligible, strict=True)]
    packed = all(_explicit_spec(kk) is None for kk in keys)
    ways = 4 if packed else 2
    if packed:
        keys = [kk.reshape(_layout(kk.size)) for kk in keys]
    group = list(range(len(keys))) if scope == "layer" else [0] * len(keys)

    # kth = smallest key with count(keys <= kth) >= k, i.e. largest r with count(keys < r) < k.
    kth, below, upto = _lift(keys, group, ks - 1, 8 * jnp.dtype(dtype).itemsize, ways)
    # k = 0 prunes nothing; kth == top: k exceeds the eligible entries, all pruned.
    tied = (ks > 0) & (kth != top)
    need = ks - below  # ties to prune, of upto - below

    def whole_ties():
        cut = kth + tied.astype(dtype)
        return [kk < cut[g] for kk, g in zip(keys, group, strict=True)]

    def split_ties():
        sizes = [kk.size for kk in keys]
        offsets = np.cumsum([0, *sizes[:-1]]).tolist() if scope == "global" else [0] * len(keys)
        total = max(sum(sizes) if scope == "global" else max(sizes), 1)
        none = jnp.asarray(jnp.iinfo(jnp.uint32).max, jnp.uint32)
        index = [
            jnp.where((kk == kth[g]) & tied[g], _flat_index(kk.shape, o).astype(jnp.uint32), none)
            for kk, g, o in zip(keys, group, offsets, strict=True)
        ]
        last, _, _ = _lift(index, group, need, total.bit_length(), ways)
        return [
            (kk < kth[g]) | (ix < last[g]) for kk, ix, g in zip(keys, index, group, strict=True)
        ]

    pruned = jax.lax.cond(jnp.all(~tied | (upto - below == need)), whole_ties, split_ties)
    return [p.reshape(s.shape) for p, s in zip(pruned, scores, strict=True)]
