"""Pruning: masks, gradual sparsity schedules and an optax ``prune`` transform.

Masks are boolean arrays (``True`` = weight kept) with the shape of the leaf
they belong to. A mask tree has the structure of the params: selected leaves
(``where``, by default the kernels) hold a mask, every other leaf holds
``None`` (an empty pytree node, so ``jax.tree.leaves(masks)`` lists only real
masks). :func:`pack_masks` stores them as bits.

Exact counts and tie-breaking
-----------------------------
A layer-wise mask of sparsity ``s`` on a leaf of ``size`` scalars has exactly
``round(s * size)`` zeros (round half to even; with a traced ``s`` the product
is formed in float32). Weights are ranked by score (``|w|`` for magnitude
pruning) and the lowest-ranked are pruned. **Equal scores are ordered by flat
position**: among tied weights the one with the smaller row-major index is
pruned first (global scope: leaves in ``jax.tree.leaves`` order, then
row-major). The selection sorts the scores once (as integer bit patterns),
reads the ``k``-th smallest and resolves ties with a cumulative count, so the
number of zeros ``k`` may be a traced value and one compiled function serves
every sparsity of a schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import sparse as jsparse

from jaxopt_nn import tree as tree_lib
from jaxopt_nn._blockwise import BlockQuantizedArray, zero_where

PyTree = Any
Sparsity = float | jax.Array | Mapping[str, float | jax.Array]

_SCOPES = ("layer", "global")
_METHODS = ("magnitude", "random", "nm", "structured")
_DISTRIBUTIONS = ("uniform", "erk")


# ---------------------------------------------------------------- validation


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_unit_interval(name: str, value: object, *, arrays: bool = True) -> None:
    """A number in [0, 1); with ``arrays``, a (possibly traced) array is also accepted."""
    if _is_number(value):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1); got {name}={value!r}")
    elif not (arrays and isinstance(value, (jax.Array, np.ndarray))):
        allowed = "a number in [0, 1)" + (" or an array" if arrays else "")
        raise TypeError(f"{name} must be {allowed}; got {name}={value!r}")


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {name}={value!r}")


def _check_nm(n: object, m: object) -> None:
    for name, value in (("n", n), ("m", m)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {name}={value!r}")
    if n > m:  # type: ignore[operator]
        raise ValueError(f"n must satisfy n <= m; got n={n!r}, m={m!r}")


def _selected_leaves(params: PyTree, where: tree_lib.Where) -> tuple[PyTree, list[tuple[str, Any]]]:
    flags = tree_lib.select(params, where)
    named = [
        item
        for item, flag in zip(
            tree_lib.leaves_with_names(params), jax.tree.leaves(flags), strict=True
        )
        if flag
    ]
    if not named:
        raise ValueError(f"where selects no leaf of params; got where={where!r}")
    return flags, named


def _unflatten(flags: PyTree, params: PyTree, values: list[Any]) -> PyTree:
    """Tree like ``params``: ``values`` at selected leaves (in order), None elsewhere."""
    it = iter(values)
    return jax.tree.map(lambda flag, _: next(it) if flag else None, flags, params)


def _per_leaf_sparsity(sparsity: Sparsity, names: list[str], scope: str) -> list[Any]:
    if isinstance(sparsity, Mapping):
        if scope != "layer":
            raise ValueError(
                "sparsity must be a single number with scope='global'; got a mapping "
                f"of {len(sparsity)} entries"
            )
        values = tree_lib.values_by_name(sparsity, names, "sparsity")
    else:
        values = [sparsity] * len(names)
    for name, value in zip(names, values, strict=True):
        _check_unit_interval(
            f"sparsity[{name!r}]" if isinstance(sparsity, Mapping) else "sparsity", value
        )
    return values


# ------------------------------------------------------------- exact selection


def _num_pruned(sparsity: Any, size: int) -> Any:
    """``round(sparsity * size)``: a Python int for numbers, int32 array if traced."""
    if _is_number(sparsity):
        return round(float(sparsity) * size)
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def _sort_key(scores: jax.Array) -> jax.Array:
    """Integer keys ordered like the non-negative float ``scores``.

    For non-negative IEEE floats the bit pattern is monotone in the value, and
    integer sorts are several times faster than float sorts on CPU.
    """
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    return jax.lax.bitcast_convert_type(scores, jnp.int32 if scores.itemsize == 4 else jnp.int64)


def _lowest(scores: jax.Array, k: Any, eligible: jax.Array | None = None) -> jax.Array:
    """Bool mask of exactly ``k`` lowest non-negative ``scores`` (1-D); ties: smaller index first.

    The ``k``-th smallest key is found with one sort; entries below it are
    pruned, and of the entries equal to it the first ``k - #below`` in index
    order. With ``eligible`` only eligible entries count and ``k`` is capped
    at their number.
    """
    if scores.size == 0:
        return jnp.zeros(scores.shape, bool)
    keys = _sort_key(scores)
    if eligible is not None:
        keys = jnp.where(eligible, keys, jnp.iinfo(keys.dtype).max)
        k = jnp.minimum(k, jnp.sum(eligible, dtype=jnp.int32))
    kth = jnp.sort(keys)[jnp.clip(k - 1, 0, keys.size - 1)]
    below = keys < kth
    ties = keys == kth
    if eligible is not None:
        below, ties = below & eligible, ties & eligible
    need = k - jnp.sum(below, dtype=jnp.int32)
    return below | (ties & (jnp.cumsum(ties, dtype=jnp.int32) <= need))


def _prune_lowest(
    scores: list[jax.Array],
    sparsities: list[Any],
    scope: str,
    eligible: list[jax.Array] | None = None,
) -> list[jax.Array]:
    """Exact-count selection over 1-D score vectors, per vector or across all."""
    sizes = [s.size for s in scores]
    elig = eligible or [None] * len(scores)
    if scope == "layer":
        return [
            _lowest(sc, _num_pruned(sp, size), el)
            for sc, sp, size, el in zip(scores, sparsities, sizes, elig, strict=True)
        ]
    flat = jnp.concatenate(scores)
    flat_elig = None if eligible is None else jnp.concatenate(eligible)
    pruned = _lowest(flat, _num_pruned(sparsities[0], sum(sizes)), flat_elig)
    return jnp.split(pruned, np.cumsum([s.size for s in scores])[:-1].tolist())


# ------------------------------------------------------------------- masks


def magnitude_masks(
    params: PyTree,
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    where: tree_lib.Where = None,
) -> PyTree:
    r"""Masks that prune the smallest-magnitude weights.

    .. math::

      m_i = \mathbb{1}\left[\operatorname{rank}(|w_i|) \ge \operatorname{round}(s \cdot n)\right]

    where ranks count from 0 in ascending ``|w|``, ties ordered by flat index
    (the smaller index is pruned first), and ``n`` is the leaf size (layer
    scope) or the total size of the selected leaves (global scope).

    Args:
      params: parameter pytree (Linen dict, ``nnx.State``, nested dict).
      sparsity: fraction of weights to prune, in ``[0, 1)``; a number, a
        traced scalar, or (layer scope) a mapping ``{path_name: sparsity}``
        covering every selected leaf (see :func:`erk`).
      scope: ``'layer'`` (each leaf hits its own sparsity) or ``'global'``
        (all selected leaves are ranked together).
      where: which leaves to prune (see :func:`jaxopt_nn.tree.select`);
        default: kernels.

    Returns:
      A tree like ``params``: bool masks (``True`` = kept) at selected leaves,
      ``None`` elsewhere.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)`` or a mapping that does
        not match the selected leaves, ``scope`` is unknown, or ``where``
        selects nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {'w': jnp.array([[1., -3.], [2., 1.]]), 'b': jnp.ones(2)}
      >>> magnitude_masks(params, 0.5)
      {'b': None, 'w': Array([[False,  True],
             [ True, False]], dtype=bool)}
    """
    _check_choice("scope", scope, _SCOPES)
    flags, named = _selected_leaves(params, where)
    sparsities = _per_leaf_sparsity(sparsity, [n for n, _ in named], scope)
    scores = [jnp.abs(leaf).ravel() for _, leaf in named]
    pruned = _prune_lowest(scores, sparsities, scope)
    masks = [~p.reshape(leaf.shape) for p, (_, leaf) in zip(pruned, named, strict=True)]
    return _unflatten(flags, params, masks)


def random_masks(
    key: jax.Array,
    params: PyTree,
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    where: tree_lib.Where = None,
) -> PyTree:
    """Masks that prune uniformly random weights, with exact counts.

    Each selected leaf ``i`` draws scores ``uniform(fold_in(key, i))``; the
    lowest are pruned exactly as in :func:`magnitude_masks`. The same ``key``
    gives nested masks: a higher sparsity prunes a superset.

    Args:
      key: a PRNG key (``jax.random.key``).
      params: parameter pytree.
      sparsity: as in :func:`magnitude_masks`.
      scope: ``'layer'`` or ``'global'``.
      where: which leaves to prune; default: kernels.

    Returns:
      Bool masks at selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: as :func:`magnitude_masks`.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> masks = random_masks(jax.random.key(0), {'w': jnp.ones((4, 5))}, 0.3)
      >>> int((~masks['w']).sum())
      6
    """
    _check_choice("scope", scope, _SCOPES)
    flags, named = _selected_leaves(params, where)
    sparsities = _per_leaf_sparsity(sparsity, [n for n, _ in named], scope)
    scores = [
        jax.random.uniform(jax.random.fold_in(key, i), (leaf.size,))
        for i, (_, leaf) in enumerate(named)
    ]
    pruned = _prune_lowest(scores, sparsities, scope)
    masks = [~p.reshape(leaf.shape) for p, (_, leaf) in zip(pruned, named, strict=True)]
    return _unflatten(flags, params, masks)


def _normalize_axis(axis: int, ndim: int, name: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must lie in [{-ndim}, {ndim}) for leaf {name!r}; got axis={axis}")
    return axis % ndim


def nm_masks(
    params: PyTree,
    n: int,
    m: int,
    *,
    axis: int = -1,
    sparsity: float | jax.Array | None = None,
    scope: str = "layer",
    where: tree_lib.Where = None,
) -> PyTree:
    r"""N:M masks: keep the ``n`` largest ``|w|`` of every ``m`` consecutive weights.

    Groups are ``m`` consecutive entries along ``axis``. Within a group the
    ``m - n`` smallest magnitudes are the *candidates* (ties: smaller index
    first). Without ``sparsity`` every candidate is pruned (exact N:M, sparsity
    ``(m - n) / m``). With ``sparsity`` only the ``round(s * size)``
    smallest-magnitude candidates are pruned, so every group keeps at least
    ``n`` weights and the sparsity is exact; at ``s = (m - n) / m`` the mask is
    exactly N:M. This is how :func:`prune` follows a schedule.

    For NVIDIA 2:4 sparse tensor cores, the groups must run along the
    reduction dimension: ``axis=0`` for a Flax ``Dense`` kernel ``(in, out)``.

    Args:
      params: parameter pytree.
      n: weights kept per group, ``1 <= n <= m``.
      m: group size; must divide the length of ``axis`` of every selected leaf.
      axis: the axis along which groups are formed.
      sparsity: optional target in ``[0, 1)``, capped at ``(m - n) / m``.
      scope: ``'layer'`` or ``'global'`` (how candidates are ranked when
        ``sparsity`` is given).
      where: which leaves to prune; default: kernels.

    Returns:
      Bool masks at selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: if ``n > m``, ``m`` does not divide the axis length, ``axis``
        is out of range, ``sparsity`` is outside ``[0, 1)`` or ``where``
        selects nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1., 4., 3., 2.], [5., 6., 8., 7.]])
      >>> nm_masks({'w': w}, 2, 4)['w']
      Array([[False,  True,  True, False],
             [False, False,  True,  True]], dtype=bool)

    References:
      Mishra et al., "Accelerating Sparse Deep Neural Networks",
      https://arxiv.org/abs/2104.08378, 2021.
    """
    _check_nm(n, m)
    _check_choice("scope", scope, _SCOPES)
    if sparsity is not None:
        _check_unit_interval("sparsity", sparsity)
    flags, named = _selected_leaves(params, where)
    grouped, shapes = [], []
    for name, leaf in named:
        ax = _normalize_axis(axis, leaf.ndim, name)
        if leaf.shape[ax] % m:
            raise ValueError(
                f"m must divide the length of axis {axis} of leaf {name!r}; "
                f"got m={m}, shape={leaf.shape}"
            )
        moved = jnp.moveaxis(jnp.abs(leaf), ax, -1)
        shapes.append((ax, moved.shape))
        grouped.append(moved.reshape(-1, m))
    ranks = [
        jnp.argsort(jnp.argsort(g, axis=-1, stable=True), axis=-1, stable=True) for g in grouped
    ]
    # Candidates back in each leaf's layout, so the exact-count selection
    # breaks ties by the leaf's own flat index, as magnitude_masks does.
    candidates = [
        jnp.moveaxis((r < m - n).reshape(shape), -1, ax)
        for r, (ax, shape) in zip(ranks, shapes, strict=True)
    ]
    if sparsity is None:
        pruned = candidates
    else:
        scores = [jnp.abs(leaf).ravel() for _, leaf in named]
        flat = [c.ravel() for c in candidates]
        selected = _prune_lowest(scores, [sparsity] * len(named), scope, flat)
        pruned = [p.reshape(c.shape) for p, c in zip(selected, candidates, strict=True)]
    return _unflatten(flags, params, [~p for p in pruned])


def structured_masks(
    params: PyTree,
    sparsity: Sparsity,
    *,
    axis: int = -1,
    norm: int = 2,
    where: tree_lib.Where = None,
) -> PyTree:
    r"""Masks that prune whole channels (slices along ``axis``) of smallest norm.

    .. math::

      \text{score}_c = \lVert W_{\ldots, c, \ldots} \rVert_p, \quad p \in \{1, 2\}

    Exactly ``round(s * C)`` of the ``C`` slices along ``axis`` are zeroed
    (ties: smaller channel index first). With the default ``axis=-1`` these
    are the output units of a ``Dense`` kernel ``(in, out)`` or the filters of
    a ``Conv`` kernel ``(h, w, in, out)``; the bias is not touched.

    Args:
      params: parameter pytree.
      sparsity: fraction of channels to prune, a number in ``[0, 1)``, traced
        scalar, or mapping ``{path_name: sparsity}``.
      axis: channel axis.
      norm: 1 or 2.
      where: which leaves to prune; default: kernels.

    Returns:
      Bool masks at selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: if ``norm`` is not 1 or 2, ``axis`` is out of range,
        ``sparsity`` is invalid or ``where`` selects nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1., 5., 0.], [1., 5., 3.]])
      >>> structured_masks({'w': w}, 0.34)['w']
      Array([[False,  True,  True],
             [False,  True,  True]], dtype=bool)
    """
    if norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2; got norm={norm!r}")
    flags, named = _selected_leaves(params, where)
    sparsities = _per_leaf_sparsity(sparsity, [n for n, _ in named], "layer")
    axes = [_normalize_axis(axis, leaf.ndim, name) for name, leaf in named]
    scores = []
    for ax, (_, leaf) in zip(axes, named, strict=True):
        rows = jnp.moveaxis(leaf, ax, 0).reshape(leaf.shape[ax], -1)
        scores.append(jnp.linalg.norm(rows.astype(jnp.float32), ord=norm, axis=1))
    pruned = _prune_lowest(scores, sparsities, "layer")
    masks = []
    for p, ax, (_, leaf) in zip(pruned, axes, named, strict=True):
        shape = [1] * leaf.ndim
        shape[ax] = leaf.shape[ax]
        masks.append(jnp.broadcast_to(~p.reshape(shape), leaf.shape))
    return _unflatten(flags, params, masks)


def _erk_sparsities(shapes: Sequence[tuple[int, ...]], sparsity: Any, power_scale: float) -> Any:
    """ERK per-leaf sparsities (NumPy for numbers, jnp for traced sparsity)."""
    xp = np if _is_number(sparsity) else jnp
    sizes = np.array([math.prod(s) for s in shapes], np.float64)
    raw = np.array([(sum(s) / math.prod(s)) ** power_scale for s in shapes], np.float64)
    dtype = np.float64 if xp is np else jnp.float32
    sizes, raw = xp.asarray(sizes, dtype), xp.asarray(raw, dtype)
    dense = xp.zeros(len(shapes), bool)

    def eps_of(dense):
        rhs = xp.sum(xp.where(dense, -sizes * sparsity, sizes * (1 - sparsity)))
        divisor = xp.sum(xp.where(dense, 0.0, raw * sizes))
        return xp.where(divisor > 0, rhs / xp.where(divisor > 0, divisor, 1.0), 0.0)

    # Layers whose density would exceed 1 become dense, largest raw first (Evci et al.).
    for _ in range(len(shapes)):
        eps = eps_of(dense)
        live_raw = xp.where(dense, -np.inf, raw)
        overflow = xp.max(live_raw) * eps > 1
        dense = dense | (overflow & (raw == xp.max(live_raw)))
    density = xp.where(dense, 1.0, xp.clip(eps_of(dense) * raw, 0.0, 1.0))
    return 1 - density


def erk(
    params: PyTree,
    sparsity: float,
    *,
    power_scale: float = 1.0,
    where: tree_lib.Where = None,
) -> dict[str, float]:
    r"""Erdos-Renyi-kernel per-leaf sparsities whose size-weighted mean is ``sparsity``.

    .. math::

      1 - s_l = \epsilon \left(\frac{\sum_i d^l_i}{\prod_i d^l_i}\right)^{p},
      \qquad \sum_l (1 - s_l)\, n_l = (1 - s) \sum_l n_l

    Leaves whose density would exceed 1 are kept dense and ``epsilon`` is
    solved again (largest ratio first), as in the reference implementation.

    Args:
      params: parameter pytree (only shapes are used).
      sparsity: overall target in ``[0, 1)``.
      power_scale: exponent ``p`` on the ratio (1.0 is ERK, 0.0 is uniform).
      where: which leaves; default: kernels.

    Returns:
      ``{path_name: sparsity}`` for every selected leaf, usable as the
      ``sparsity`` of :func:`magnitude_masks` / :func:`random_masks`.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)`` or ``where`` selects
        nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> s = erk({'a': jnp.zeros((10, 10)), 'b': jnp.zeros((100, 10))}, 0.5)
      >>> {k: round(v, 4) for k, v in s.items()}
      {'a': 0.1538, 'b': 0.5346}

    References:
      Evci, Gale, Menick, Castro, Elsen, "Rigging the Lottery: Making All
      Tickets Winners", ICML 2020, https://arxiv.org/abs/1911.11134
      (Section 3, sparsity distribution).
    """
    _check_unit_interval("sparsity", sparsity)
    _, named = _selected_leaves(params, where)
    values = _erk_sparsities(
        [tuple(np.shape(leaf)) for _, leaf in named], float(sparsity), power_scale
    )
    return {name: float(v) for (name, _), v in zip(named, values, strict=True)}


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    r"""Zero the pruned weights: :math:`W_{new} = W_{old} \odot M`.

    Computed as ``where(mask, w, 0)``, so pruned entries are ``+0.0`` even for
    negative or non-finite weights. Leaves whose mask is ``None`` pass through.

    Args:
      params: parameter pytree.
      masks: mask tree from one of the ``*_masks`` functions (or any tree
        with the structure of ``params`` holding bool arrays or ``None``).

    Returns:
      ``params`` with pruned weights set to zero.

    Example:
      >>> import jax.numpy as jnp
      >>> apply_masks({'w': jnp.array([1., -2.])}, {'w': jnp.array([True, False])})
      {'w': Array([1., 0.], dtype=float32)}
    """
    return jax.tree.map(
        lambda p, mk: p if mk is None else jnp.where(mk, p, jnp.zeros((), p.dtype)),
        params,
        masks,
    )


def pack_masks(masks: PyTree) -> PyTree:
    """Pack bool masks into ``uint8`` bits (8 weights per byte), flat, big-endian bit order.

    Example:
      >>> import jax.numpy as jnp
      >>> pack_masks({'w': jnp.array([[True, False], [True, True]])})['w']
      Array([176], dtype=uint8)
    """
    return jax.tree.map(lambda mk: jnp.packbits(mk.ravel()), masks)


def unpack_masks(packed: PyTree, like: PyTree) -> PyTree:
    """Inverse of :func:`pack_masks`; ``like`` gives the shapes (params or masks).

    Example:
      >>> import jax.numpy as jnp
      >>> masks = {'w': jnp.array([[True, False], [True, True]])}
      >>> bool((unpack_masks(pack_masks(masks), masks)['w'] == masks['w']).all())
      True
    """

    def unpack(leaf: Any, bits: jax.Array | None) -> jax.Array | None:
        if bits is None:
            return None
        shape = np.shape(leaf)
        return jnp.unpackbits(bits, count=math.prod(shape)).reshape(shape).astype(bool)

    return jax.tree.map(unpack, like, packed)


# ---------------------------------------------------------------- summaries


class SparsityRow(NamedTuple):
    """One row of :func:`sparsity_summary`."""

    name: str  # readable path ('total' for the last row)
    size: int  # number of scalars
    nonzeros: int  # scalars != 0
    sparsity: float  # 1 - nonzeros / size


class SparsitySummary(NamedTuple):
    """Per-leaf rows and the total of the selected leaves; ``str()`` is a table."""

    rows: list[SparsityRow]
    total: SparsityRow

    def __str__(self) -> str:
        return tree_lib.format_table(
            ["name", "size", "nonzeros", "sparsity"],
            [[r.name, r.size, r.nonzeros, f"{r.sparsity:.2%}"] for r in [*self.rows, self.total]],
        )


def sparsity_summary(params: PyTree, where: tree_lib.Where = None) -> SparsitySummary:
    """Size, nonzeros and sparsity of each selected leaf and in total.

    Args:
      params: parameter pytree (concrete arrays; runs on the host).
      where: which leaves to report; default: kernels.

    Returns:
      A :class:`SparsitySummary`; ``print(summary)`` shows a table.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {'w': jnp.array([[0., 1.], [0., 0.]]), 'v': jnp.ones((2, 3))}
      >>> print(sparsity_summary(params))
      name   size  nonzeros  sparsity
      v         6         6     0.00%
      w         4         1    75.00%
      total    10         7    30.00%
    """
    _, named = _selected_leaves(params, where)
    rows = []
    for name, leaf in named:
        arr = np.asarray(leaf)
        size, nonzeros = int(arr.size), int(np.count_nonzero(arr))
        rows.append(SparsityRow(name, size, nonzeros, 1 - nonzeros / size if size else 0.0))
    size = sum(r.size for r in rows)
    nonzeros = sum(r.nonzeros for r in rows)
    total = SparsityRow("total", size, nonzeros, 1 - nonzeros / size if size else 0.0)
    return SparsitySummary(rows, total)


# ------------------------------------------------------------------ export


def to_sparse(params: PyTree, where: tree_lib.Where = None) -> PyTree:
    """Replace selected leaves by ``jax.experimental.sparse.BCOO`` (nonzeros only).

    Runs eagerly (the number of stored entries is read from the data). A
    ``BCOO`` kernel ``w`` works in inference as ``x @ w``.

    Args:
      params: parameter pytree, typically after pruning.
      where: which leaves to convert; default: kernels.

    Returns:
      ``params`` with selected leaves as ``BCOO`` holding their nonzeros.

    Example:
      >>> import jax.numpy as jnp
      >>> sp = to_sparse({'w': jnp.array([[0., 2.], [0., 0.]])})
      >>> sp['w'].nse, from_sparse(sp)['w'].tolist()
      (1, [[0.0, 2.0], [0.0, 0.0]])
    """
    _selected_leaves(params, where)
    return tree_lib.map_selected(
        lambda leaf: jsparse.BCOO.fromdense(leaf, nse=int(np.count_nonzero(np.asarray(leaf)))),
        params,
        where=where,
    )


def from_sparse(params: PyTree) -> PyTree:
    """Inverse of :func:`to_sparse`: ``BCOO`` leaves become dense arrays.

    The round trip is exact (same values, shape and dtype); a ``-0.0`` weight
    is a zero and comes back as ``+0.0``.
    """
    return jax.tree.map(
        lambda x: x.todense() if isinstance(x, jsparse.BCOO) else x,
        params,
        is_leaf=lambda x: isinstance(x, jsparse.BCOO),
    )


# --------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
    """A sparsity schedule: ``schedule(step)`` is the sparsity after update ``step``.

    Attributes:
      sparsity: ``step -> float32 scalar`` (jnp-compatible, traceable).
      is_update_step: ``step -> bool scalar``: whether masks are recomputed at
        ``step``; between update steps the masks (and so the sparsity) stay.
      final_sparsity: the value the schedule ends at.
    """

    sparsity: Callable[[jax.typing.ArrayLike], jax.Array]
    is_update_step: Callable[[jax.typing.ArrayLike], jax.Array]
    final_sparsity: float

    def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
        return self.sparsity(step)


def _check_step(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")


def polynomial_schedule(
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
    power: float = 3.0,
    frequency: int = 1,
) -> SparsitySchedule:
    r"""Gradual pruning schedule of Zhu & Gupta (2017).

    .. math::

      s_t = s_f + (s_i - s_f) \left(1 - \frac{t - t_0}{n \Delta t}\right)^{p}

    with :math:`t_0` = ``begin_step``, :math:`t_0 + n \Delta t` = ``end_step``
    and :math:`\Delta t` = ``frequency``. Masks are recomputed at
    ``t0, t0 + dt, ...`` and at ``end_step``; between those steps the value
    of the last update step holds. Before ``begin_step`` the sparsity is 0,
    after ``end_step`` it is ``final_sparsity``.

    Args:
      final_sparsity: :math:`s_f` in ``[0, 1)``.
      begin_step: first pruning step :math:`t_0 \ge 0`.
      end_step: last pruning step, ``> begin_step``.
      initial_sparsity: :math:`s_i` in ``[0, 1)``, reached at ``begin_step``.
      power: exponent :math:`p > 0` (3 in the paper).
      frequency: :math:`\Delta t \ge 1`, steps between mask updates.

    Returns:
      A :class:`SparsitySchedule`.

    Raises:
      ValueError: if a sparsity is outside ``[0, 1)``, ``begin_step >=
        end_step``, ``frequency < 1`` or ``power <= 0``.

    Example:
      >>> sched = polynomial_schedule(0.8, begin_step=0, end_step=10, frequency=5)
      >>> [round(float(sched(t)), 3) for t in (0, 4, 5, 9, 10, 20)]
      [0.0, 0.0, 0.7, 0.7, 0.8, 0.8]
      >>> [bool(sched.is_update_step(t)) for t in (0, 4, 5, 10, 15)]
      [True, False, True, True, False]

    References:
      Zhu, Gupta, "To prune, or not to prune: exploring the efficacy of
      pruning for model compression", https://arxiv.org/abs/1710.01878, 2017
      (Equation 1).
    """
    _check_unit_interval("final_sparsity", final_sparsity, arrays=False)
    _check_unit_interval("initial_sparsity", initial_sparsity, arrays=False)
    _check_step("begin_step", begin_step, 0)
    _check_step("frequency", frequency, 1)
    if (
        not isinstance(end_step, (int, np.integer))
        or isinstance(end_step, bool)
        or end_step <= begin_step
    ):
        raise ValueError(
            f"end_step must be an integer > begin_step={begin_step}; got end_step={end_step!r}"
        )
    if not _is_number(power) or power <= 0:
        raise ValueError(f"power must be a number > 0; got power={power!r}")

    def sparsity(step):
        step = jnp.asarray(step, jnp.int32)
        last = jnp.where(
            step >= end_step, end_step, begin_step + (step - begin_step) // frequency * frequency
        )
        frac = jnp.clip((last - begin_step) / (end_step - begin_step), 0.0, 1.0)
        value = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power
        return jnp.where(step < begin_step, 0.0, value).astype(jnp.float32)

    def is_update_step(step):
        step = jnp.asarray(step, jnp.int32)
        on_grid = ((step - begin_step) % frequency == 0) | (step == end_step)
        return (step >= begin_step) & (step <= end_step) & on_grid

    return SparsitySchedule(sparsity, is_update_step, float(final_sparsity))


def one_shot(step: int, sparsity: float) -> SparsitySchedule:
    """Prune once at ``step`` to ``sparsity``; masks stay fixed afterwards.

    Args:
      step: the update step at which masks are computed (``>= 0``).
      sparsity: target in ``[0, 1)``.

    Returns:
      A :class:`SparsitySchedule` that is 0 before ``step`` and ``sparsity``
      from ``step`` on.

    Raises:
      ValueError: if ``step < 0`` or ``sparsity`` is outside ``[0, 1)``.

    Example:
      >>> sched = one_shot(3, 0.9)
      >>> [round(float(sched(t)), 2) for t in (2, 3, 4)], bool(sched.is_update_step(4))
      ([0.0, 0.9, 0.9], False)
    """
    _check_step("step", step, 0)
    _check_unit_interval("sparsity", sparsity, arrays=False)
    return SparsitySchedule(
        lambda t: jnp.where(jnp.asarray(t) >= step, sparsity, 0.0).astype(jnp.float32),
        lambda t: jnp.asarray(t) == step,
        float(sparsity),
    )


def constant(sparsity: float, *, frequency: int = 1) -> SparsitySchedule:
    """Constant sparsity; masks are recomputed every ``frequency`` steps (from step 0).

    Args:
      sparsity: target in ``[0, 1)``.
      frequency: steps between mask updates (``>= 1``).

    Returns:
      A :class:`SparsitySchedule`.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)`` or ``frequency < 1``.

    Example:
      >>> sched = constant(0.5, frequency=2)
      >>> float(sched(7)), [bool(sched.is_update_step(t)) for t in range(3)]
      (0.5, [True, False, True])
    """
    _check_unit_interval("sparsity", sparsity, arrays=False)
    _check_step("frequency", frequency, 1)
    return SparsitySchedule(
        lambda t: jnp.full((), sparsity, jnp.float32),
        lambda t: jnp.asarray(t) % frequency == 0,
        float(sparsity),
    )


# ------------------------------------------------------------- transform


class PruneState(NamedTuple):
    """State of :func:`prune`."""

    count: jax.Array  # int32, shape (): number of updates applied so far
    masks: optax.Params  # the params' tree: bool mask (True = kept) per selected leaf, else None
    inner_state: optax.OptState  # state of ``inner``; optax.EmptyState() without ``inner``


def _zero_pruned(x: Any, mk: jax.Array | None) -> Any:
    """``where(mk, x, 0)``; ``x`` unchanged without a mask of its shape.

    An 8-bit moment (:class:`BlockQuantizedArray`) gets code 0 at pruned
    positions: zero for first moments, the smallest representable root for
    second moments (whose gradients are masked to zero from then on).
    """
    if isinstance(x, BlockQuantizedArray) and mk is not None:
        return zero_where(x, mk)
    if mk is None or np.shape(x) != mk.shape:
        return x
    return jnp.where(mk, x, jnp.zeros((), x.dtype))


def prune(
    schedule: SparsitySchedule | float,
    *,
    method: str = "magnitude",
    scope: str = "layer",
    where: tree_lib.Where = None,
    distribution: str = "uniform",
    n: int | None = None,
    m: int | None = None,
    axis: int = -1,
    norm: int = 2,
    key: jax.Array | None = None,
    inner: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradual pruning as an optax transform: pruned weights end at exactly 0.0.

    Chain it after an optimizer. At update step ``t`` (``state.count``) with
    ``schedule.is_update_step(t)`` the masks are recomputed from the current
    weights ``w`` at sparsity ``schedule(t)`` (as tfmot and Zhu & Gupta do;
    ranking ``w + u`` instead would force the incoming updates to be
    materialised before the gate on every step); on other steps they are kept.
    The emitted update is

    .. math::

      u'_i = \begin{cases} u_i & m_i = 1 \\ -w_i & m_i = 0 \end{cases}

    so ``optax.apply_updates`` gives exactly ``0.0`` at every pruned position
    (bit-exact, on every later step too), and after update ``t`` the selected
    leaves have the sparsity ``schedule(t)`` (``round(s * size)`` zeros per
    leaf, as :func:`magnitude_masks`). The mask update is gated by
    ``lax.cond``: one compilation serves update and non-update steps.

    Methods: ``'magnitude'`` (smallest ``|w|``), ``'random'`` (fixed random
    scores from ``key``, so masks are nested as sparsity grows),
    ``'structured'`` (whole channels along ``axis`` by ``norm``; sparsity
    counts channels) and ``'nm'``: the smallest candidates of
    :func:`nm_masks` are pruned up to ``schedule(t)``, so every group keeps
    at least ``n`` weights throughout and the mask is exactly N:M when the
    schedule reaches ``(m - n) / m``.

    With ``inner=tx``, ``prune`` wraps the optimizer: gradients are masked
    before ``tx`` sees them, and on mask updates ``tx``'s parameter-shaped
    state (e.g. Adam moments) is zeroed at newly pruned positions, so the
    moments of pruned weights stay exactly zero and pruned weights do not
    regrow.

    Args:
      schedule: a :class:`SparsitySchedule` (:func:`polynomial_schedule`,
        :func:`one_shot`, :func:`constant`) or a number (``constant``).
      method: ``'magnitude'``, ``'random'``, ``'nm'`` or ``'structured'``.
      scope: ``'layer'`` or ``'global'`` (magnitude, random, nm).
      where: which leaves to prune; default: kernels.
      distribution: ``'uniform'`` (every leaf at ``schedule(t)``) or
        ``'erk'`` (per-leaf sparsities from :func:`erk`, layer scope,
        magnitude/random).
      n: weights kept per group (``method='nm'``).
      m: group size (``method='nm'``).
      axis: group axis (nm) or channel axis (structured).
      norm: 1 or 2 (structured).
      key: PRNG key (``method='random'``).
      inner: optional optimizer to wrap with gradient masking.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`PruneState`. ``update`` needs ``params``.

    Raises:
      ValueError: for an unknown ``method``/``scope``/``distribution``, a
        missing or invalid ``n``/``m``/``key``/``norm``, an N:M schedule that
        does not end at ``(m - n) / m``, or (at ``init``) a ``where`` that
        selects nothing or ``m`` not dividing the axis length.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> params = {'w': jnp.array([[0.5, -1.0], [2.0, 0.1]])}
      >>> tx = optax.chain(optax.sgd(0.1), prune(one_shot(0, 0.5)))
      >>> state = tx.init(params)
      >>> grads = {'w': jnp.ones((2, 2))}
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)['w']
      Array([[ 0. , -1.1],
             [ 1.9,  0. ]], dtype=float32)

    References:
      Zhu, Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878,
      2017; Han, Pool, Tran, Dally, "Learning both Weights and Connections
      for Efficient Neural Networks", https://arxiv.org/abs/1506.02626, 2015.
    """
    if _is_number(schedule):
        _check_unit_interval("schedule", schedule, arrays=False)
        schedule = constant(float(schedule))
    if not isinstance(schedule, SparsitySchedule):
        raise TypeError(
            "schedule must be a SparsitySchedule (polynomial_schedule, one_shot, constant) "
            f"or a number; got schedule={schedule!r}"
        )
    _check_choice("method", method, _METHODS)
    _check_choice("scope", scope, _SCOPES)
    _check_choice("distribution", distribution, _DISTRIBUTIONS)
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be an int; got axis={axis!r}")
    if method == "nm":
        _check_nm(n, m)
        if not math.isclose(schedule.final_sparsity, (m - n) / m, abs_tol=1e-6):
            raise ValueError(
                f"method='nm' with n={n}, m={m} needs a schedule ending at (m - n) / m = "
                f"{(m - n) / m}; got final_sparsity={schedule.final_sparsity}"
            )
    elif n is not None or m is not None:
        raise ValueError(f"n and m are only used by method='nm'; got method={method!r}")
    if method == "random" and key is None:
        raise ValueError("key must be a PRNG key (jax.random.key) when method='random'")
    if method != "random" and key is not None:
        raise ValueError(f"key is only used by method='random'; got method={method!r}")
    if method == "structured" and scope != "layer":
        raise ValueError(f"scope must be 'layer' with method='structured'; got scope={scope!r}")
    if method == "structured" and norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2; got norm={norm!r}")
    if distribution == "erk" and (scope != "layer" or method not in ("magnitude", "random")):
        raise ValueError(
            "distribution='erk' needs scope='layer' and method 'magnitude' or 'random'; "
            f"got scope={scope!r}, method={method!r}"
        )

    def compute_masks(params: PyTree, sparsity: Any) -> PyTree:
        if distribution == "erk":
            _, named = _selected_leaves(params, where)
            values = _erk_sparsities([leaf.shape for _, leaf in named], sparsity, 1.0)
            sparsity = {name: values[i] for i, (name, _) in enumerate(named)}
        if method == "magnitude":
            return magnitude_masks(params, sparsity, scope=scope, where=where)
        if method == "random":
            return random_masks(key, params, sparsity, scope=scope, where=where)
        if method == "nm":
            return nm_masks(params, n, m, axis=axis, sparsity=sparsity, scope=scope, where=where)
        return structured_masks(params, sparsity, axis=axis, norm=norm, where=where)

    def init_fn(params: optax.Params) -> PruneState:
        # Runs every shape check (selection, axis, m | length) without computing.
        jax.eval_shape(compute_masks, params, jnp.zeros((), jnp.float32))
        flags, named = _selected_leaves(params, where)
        masks = _unflatten(flags, params, [jnp.ones(np.shape(leaf), bool) for _, leaf in named])
        inner_state = optax.EmptyState() if inner is None else inner.init(params)
        return PruneState(jnp.zeros((), jnp.int32), masks, inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("prune needs params: call update(updates, state, params)")
        inner_state = state.inner_state
        if inner is not None:
            grads = jax.tree.map(_zero_pruned, updates, state.masks)
            updates, inner_state = inner.update(grads, inner_state, params, **extra_args)

        def refresh(carry):
            _, inner_state = carry
            masks = compute_masks(params, schedule(state.count))
            if inner is not None:
                inner_state = optax.tree_map_params(
                    inner,
                    _zero_pruned,
                    inner_state,
                    masks,
                    is_leaf=lambda x: isinstance(x, BlockQuantizedArray),
                )
            return masks, inner_state

        masks, inner_state = jax.lax.cond(
            schedule.is_update_step(state.count),
            refresh,
            lambda carry: carry,
            (state.masks, inner_state),
        )
        updates = jax.tree.map(
            lambda u, p, mk: u if mk is None else jnp.where(mk, u, -p), updates, params, masks
        )
        return updates, PruneState(optax.safe_increment(state.count), masks, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
