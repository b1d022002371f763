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
row-major). Nothing is sorted: the ``k``-th smallest score is found by
binary lifting on its float bit pattern (one counting pass per two bits;
per bit for explicitly sharded leaves), and
ties at the threshold by a second lifting on the flat index, run only when
ties straddle it. So the number of zeros ``k`` may be a traced value, one
compiled function serves every sparsity of a schedule, and sharded leaves are
never gathered or reshaped.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.core import Tracer
from jax.experimental import sparse as jsparse
from jax.sharding import PartitionSpec as P

from jaxopt_nn import tree as tree_lib
from jaxopt_nn._blockwise import BlockQuantizedArray, zero_where
from jaxopt_nn._selection import (
    _count,
    _explicit_spec,
    _gathered,
    _is_number,
    _like,
    _prune_lowest,
    _select_lowest,
)

PyTree = Any
Sparsity = float | jax.Array | Mapping[str, float | jax.Array]

_SCOPES = ("layer", "global")
_METHODS = (
    "magnitude",
    "saliency",
    "random",
    "nm",
    "structured",
    "static",
    "set",
    "rigl",
    "ste",
)
_DYNAMIC = ("set", "rigl")
_DISTRIBUTIONS = ("uniform", "erk")


# ---------------------------------------------------------------- validation


def _check_unit_interval(name: str, value: object, *, arrays: bool = True) -> None:
    """A number in [0, 1); with ``arrays``, a (possibly traced) array is also accepted."""
    if _is_number(value):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1); got {name}={value!r}")
    elif arrays and isinstance(value, (jax.Array, np.ndarray)):
        # Checked when its values are known here: not traced, not split across hosts.
        known = not isinstance(value, Tracer) and getattr(value, "is_fully_addressable", True)
        if known and not np.all((np.asarray(value) >= 0) & (np.asarray(value) < 1)):
            raise ValueError(f"{name} must lie in [0, 1); got {name}={value!r}")
    else:
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


# ------------------------------------------------------------------- masks


def magnitude_masks(
    params: PyTree,
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    where: tree_lib.Where = None,
    block: tuple[int, int] | None = None,
    normalize: bool = False,
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
      block: ``(bh, bw)``: prune whole blocks of the last two axes, scored
        by the sum of their scores; exactly ``round(s * blocks)`` blocks are
        pruned (ties: smaller block index first). ``bh`` and ``bw`` must
        divide those axes. ``(1, 4)`` keeps or drops runs of 4 inputs.
      normalize: divide each leaf's scores by their L2 norm before ranking,
        so that global ranking compares layers on an equal footing.

    Returns:
      A tree like ``params``: bool masks (``True`` = kept) at selected leaves,
      ``None`` elsewhere.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)`` or a mapping that does
        not match the selected leaves, ``scope`` is unknown, ``where``
        selects nothing, or ``block`` does not tile a selected leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {'w': jnp.array([[1., -3.], [2., 1.]]), 'b': jnp.ones(2)}
      >>> magnitude_masks(params, 0.5)
      {'b': None, 'w': Array([[False,  True],
             [ True, False]], dtype=bool)}
    """
    _check_choice("scope", scope, _SCOPES)
    _check_block(block)
    flags, named = _selected_leaves(params, where)
    sparsities = _per_leaf_sparsity(sparsity, [n for n, _ in named], scope)
    scores = [jnp.abs(jnp.asarray(leaf)) for _, leaf in named]
    return _unflatten(flags, params, _by_score(named, scores, sparsities, scope, block, normalize))


def saliency_masks(
    params: PyTree,
    grads: PyTree,
    sparsity: Sparsity,
    *,
    scope: str = "layer",
    where: tree_lib.Where = None,
    block: tuple[int, int] | None = None,
    normalize: bool = False,
) -> PyTree:
    r"""Masks that prune the weights of smallest saliency :math:`|w \cdot g|`.

    The first-order Taylor estimate of the loss change when a weight is set
    to zero (Molchanov et al. 2017; jaxpruner's ``SaliencyPruning``). Ranking,
    exact counts, ties, ``block`` and ``normalize`` are as in
    :func:`magnitude_masks`.

    Args:
      params: parameter pytree.
      grads: gradients, a tree like ``params``.
      sparsity: as in :func:`magnitude_masks`.
      scope: ``'layer'`` or ``'global'``.
      where: which leaves to prune; default: kernels.
      block: optional ``(bh, bw)`` block shape.
      normalize: divide each leaf's scores by their L2 norm.

    Returns:
      Bool masks at selected leaves, ``None`` elsewhere.

    Raises:
      ValueError: as :func:`magnitude_masks`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {'w': jnp.array([[1., -3.], [2., 1.]])}
      >>> grads = {'w': jnp.array([[4., 0.1], [1., 1.]])}
      >>> saliency_masks(params, grads, 0.5)['w']
      Array([[ True, False],
             [ True, False]], dtype=bool)

    References:
      Molchanov, Tyree, Karras, Aila, Kautz, "Pruning Convolutional Neural
      Networks for Resource Efficient Inference", ICLR 2017,
      https://arxiv.org/abs/1611.06440.
    """
    _check_choice("scope", scope, _SCOPES)
    _check_block(block)
    flags, named = _selected_leaves(params, where)
    sparsities = _per_leaf_sparsity(sparsity, [n for n, _ in named], scope)
    grad_leaves = [
        g for g, flag in zip(jax.tree.leaves(grads), jax.tree.leaves(flags), strict=True) if flag
    ]
    scores = _saliency(named, grad_leaves)
    return _unflatten(flags, params, _by_score(named, scores, sparsities, scope, block, normalize))


def _saliency(named: list[tuple[str, Any]], grads: list[Any]) -> list[jax.Array]:
    # In float32 at least: |w * g| of small float16 weights and gradients underflows.
    return [
        jnp.abs(_at_least_f32(leaf) * _at_least_f32(g))
        for (_, leaf), g in zip(named, grads, strict=True)
    ]


def _at_least_f32(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_block(block: object) -> None:
    if block is None:
        return
    if (
        not isinstance(block, tuple)
        or len(block) != 2
        or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in block
        )
    ):
        raise ValueError(f"block must be a pair of ints >= 1 (bh, bw); got block={block!r}")


def _block_sums(name: str, scores: jax.Array, block: tuple[int, int]) -> jax.Array:
    """Sum of ``scores`` over each ``block`` of the last two axes."""
    bh, bw = block
    if scores.ndim < 2 or scores.shape[-2] % bh or scores.shape[-1] % bw:
        raise ValueError(
            f"block must tile the last two axes of leaf {name!r}; got block={block}, "
            f"shape={scores.shape}"
        )
    *lead, h, w = scores.shape
    # Regroups both axes: gathered first under an explicit mesh.
    tiles = _gathered(scores).reshape(*lead, h // bh, bh, w // bw, bw)
    return jnp.sum(tiles, axis=(-3, -1))


def _by_score(
    named: list[tuple[str, Any]],
    scores: list[jax.Array],
    sparsities: list[Any],
    scope: str,
    block: tuple[int, int] | None,
    normalize: bool,
) -> list[jax.Array]:
    """Masks keeping the highest ``scores`` (per block), sharded like their leaves."""
    if block is not None or normalize:  # sums of float16 scores overflow
        scores = [_at_least_f32(sc) for sc in scores]
    if block is not None:
        scores = [_block_sums(name, sc, block) for (name, _), sc in zip(named, scores, strict=True)]
    if normalize:
        scores = [
            sc / jnp.maximum(jnp.sqrt(jnp.sum(sc * sc)), jnp.finfo(sc.dtype).tiny) for sc in scores
        ]
    pruned = _prune_lowest(scores, sparsities, scope)
    if block is not None:
        pruned = [jnp.repeat(jnp.repeat(p, block[0], axis=-2), block[1], axis=-1) for p in pruned]
    return [_like(~p, leaf) for p, (_, leaf) in zip(pruned, named, strict=True)]


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
    return _unflatten(flags, params, _random(key, [leaf for _, leaf in named], sparsities, scope))


def _random(
    key: jax.Array, leaves: list[Any], sparsities: list[Any], scope: str
) -> list[jax.Array]:
    scores = [
        jax.random.uniform(jax.random.fold_in(key, i), np.shape(leaf))
        for i, leaf in enumerate(leaves)
    ]
    pruned = _prune_lowest(scores, sparsities, scope)
    return [_like(~p, leaf) for p, leaf in zip(pruned, leaves, strict=True)]


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
    return _unflatten(flags, params, _nm(named, n, m, axis, sparsity, scope))


def _nm(
    named: list[tuple[str, Any]], n: int, m: int, axis: int, sparsity: Any, scope: str
) -> list[jax.Array]:
    grouped, shapes = [], []
    for name, leaf in named:
        ax = _normalize_axis(axis, np.ndim(leaf), name)
        if np.shape(leaf)[ax] % m:
            raise ValueError(
                f"m must divide the length of axis {axis} of leaf {name!r}; "
                f"got m={m}, shape={np.shape(leaf)}"
            )
        # Grouping regroups the axis: gathered first under an explicit mesh.
        moved = jnp.moveaxis(_gathered(jnp.abs(jnp.asarray(leaf))), ax, -1)
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
    if sparsity is not None:
        scores = [jnp.abs(jnp.asarray(leaf)) for _, leaf in named]
        candidates = _prune_lowest(scores, [sparsity] * len(named), scope, candidates)
    return [_like(~p, leaf) for p, (_, leaf) in zip(candidates, named, strict=True)]


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
    return _unflatten(flags, params, _structured(named, sparsities, axis, norm))


def _structured(
    named: list[tuple[str, Any]], sparsities: list[Any], axis: int, norm: int
) -> list[jax.Array]:
    axes = [_normalize_axis(axis, np.ndim(leaf), name) for name, leaf in named]
    scores = []
    for ax, (_, leaf) in zip(axes, named, strict=True):
        x = jnp.abs(_at_least_f32(leaf))
        others = tuple(d for d in range(x.ndim) if d != ax)
        scores.append(jnp.sum(x, others) if norm == 1 else jnp.sqrt(jnp.sum(x * x, others)))
    pruned = _prune_lowest(scores, sparsities, "layer")
    masks = []
    for p, ax, (_, leaf) in zip(pruned, axes, named, strict=True):
        shape = [1] * np.ndim(leaf)
        shape[ax] = np.shape(leaf)[ax]
        masks.append(_like(jnp.broadcast_to(~p.reshape(shape), np.shape(leaf)), leaf))
    return masks


def _erk_sparsities(shapes: Sequence[tuple[int, ...]], sparsity: Any, power_scale: float) -> Any:
    """ERK per-leaf sparsities (NumPy for numbers, jnp for traced sparsity)."""
    xp = np if _is_number(sparsity) else jnp
    sizes = np.array([math.prod(s) for s in shapes], np.float64)
    # A leaf without weights gets no share of the kept ones.
    raw = np.array(
        [(sum(s) / math.prod(s)) ** power_scale if math.prod(s) else 0.0 for s in shapes],
        np.float64,
    )
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
        with the structure of ``params`` holding bool arrays or ``None``),
        or the state masks of :func:`prune`, bool or bit-packed
        (``packed=True``).

    Returns:
      ``params`` with pruned weights set to zero.

    Example:
      >>> import jax.numpy as jnp
      >>> apply_masks({'w': jnp.array([1., -2.])}, {'w': jnp.array([True, False])})
      {'w': Array([1., 0.], dtype=float32)}
    """

    def apply(p: Any, mk: Any) -> Any:
        if mk is None:
            return p
        mk = _unpack(mk, p) if mk.dtype == jnp.uint8 else mk
        return jnp.where(mk, p, jnp.zeros((), p.dtype))

    return jax.tree.map(apply, params, masks)


def _pack_flat(mask: jax.Array) -> jax.Array:
    """Bit planes of the flat ``mask``: bit ``j`` of byte ``i`` is entry ``j * L + i``.

    ``L = ceil(size / 8)`` bytes; every plane is a contiguous slice, so packing
    and unpacking vectorise along the long axis (a fused unpack-and-select
    costs about one ``where``, 2-4x less than ``jnp.unpackbits`` on CPU).
    """
    flat = mask.ravel()
    length = -(-flat.size // 8)
    planes = jnp.pad(flat, (0, 8 * length - flat.size)).reshape(8, length).astype(jnp.uint8)
    return jnp.sum(planes << jnp.arange(8, dtype=jnp.uint8)[:, None], axis=0, dtype=jnp.uint8)


def _unpack_flat(bits: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_pack_flat` for a mask of ``shape``."""
    planes = (bits[None, :] >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1
    return planes.reshape(-1)[: math.prod(shape)].reshape(shape).astype(bool)


def pack_masks(masks: PyTree) -> PyTree:
    """Pack bool masks into ``uint8`` bits, 8 weights per byte (``ceil(size / 8)`` bytes).

    Bit ``j`` (value ``2**j``) of byte ``i`` holds flat entry ``j * L + i``
    with ``L = ceil(size / 8)``: eight contiguous bit planes, which pack and
    unpack fast. ``prune(packed=True)`` keeps its masks in this layout.

    Example:
      >>> import jax.numpy as jnp
      >>> pack_masks({'w': jnp.array([[True, False], [True, True]])})['w']  # 1 + 4 + 8
      Array([13], dtype=uint8)
    """
    return jax.tree.map(_pack_flat, masks)


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
        bits = jnp.asarray(bits)
        if bits.ndim == 0:  # prune(packed=True) keeps a scalar True where it never prunes
            return jnp.broadcast_to(bits.astype(bool), np.shape(leaf))
        return _unpack(bits, leaf)

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


class SparsityStats(NamedTuple):
    """Arrays of :func:`sparsity_stats` (jittable; sizes are static)."""

    nonzeros: dict[str, jax.Array]  # int32, shape (): entries != 0 per selected leaf
    sparsity: dict[str, jax.Array]  # float32, shape (): 1 - nonzeros / size per selected leaf
    total_nonzeros: jax.Array  # int32, shape (): over the selected leaves
    total_sparsity: jax.Array  # float32, shape (): 1 - total_nonzeros / total size


def sparsity_stats(params: PyTree, where: tree_lib.Where = None) -> SparsityStats:
    """Nonzeros and sparsity of each selected leaf and in total, as arrays.

    The traceable form of :func:`sparsity_summary`: it runs under ``jax.jit``
    (e.g. to log sparsity from inside a train step) and on sharded params. A
    leaf of size 0 has sparsity 0.

    Args:
      params: parameter pytree (arrays or tracers).
      where: which leaves to report; default: kernels.

    Returns:
      A :class:`SparsityStats` whose dicts are keyed by leaf name.

    Raises:
      ValueError: if ``where`` selects nothing.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> params = {'w': jnp.array([[0., 1.], [0., 0.]]), 'v': jnp.ones((2, 3))}
      >>> stats = jax.jit(sparsity_stats)(params)
      >>> int(stats.nonzeros['w']), float(stats.sparsity['w']), float(stats.total_sparsity)
      (1, 0.75, 0.30000001192092896)
    """
    _, named = _selected_leaves(params, where)
    nonzeros = {name: jnp.sum(leaf != 0, dtype=jnp.int32) for name, leaf in named}
    sizes = {name: math.prod(np.shape(leaf)) for name, leaf in named}

    def sparsity(nnz: jax.Array, size: int) -> jax.Array:
        if not size:
            return jnp.zeros((), jnp.float32)
        return ((size - nnz).astype(jnp.float32) / size).astype(jnp.float32)

    total = sum(nonzeros.values(), jnp.zeros((), jnp.int32))
    return SparsityStats(
        nonzeros,
        {name: sparsity(nnz, sizes[name]) for name, nnz in nonzeros.items()},
        total,
        sparsity(total, sum(sizes.values())),
    )


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

    ``t`` is the 0-based index of the update (``PruneState.count``): the
    first pruning step has :math:`s_i` and ``end_step`` has exactly
    :math:`s_f`, as in Zhu & Gupta's Equation 1 (:math:`t \in \{t_0, \ldots,
    t_0 + n\Delta t\}`) and tfmot's ``PolynomialDecay`` (evaluated at the
    step of the batch being trained). jaxpruner evaluates one step ahead
    (``t + 1 - t0``), so its ramp is one update further along. A run must
    apply ``end_step + 1`` updates to reach the target: for ``T`` training
    steps, ``end_step = T - 1`` ends the ramp on the last one.

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
    # The params' tree, one bool array of the leaf's shape per leaf (True = kept,
    # all True at leaves ``where`` does not select), sharded like its leaf; so
    # the state maps like params (optax.tree.map_params, state shardings).
    # With ``packed=True``: uint8 bits at selected leaves, a scalar True elsewhere.
    masks: optax.Params
    inner_state: optax.OptState  # state of ``inner``; optax.EmptyState() without ``inner``


def _is_none(x: Any) -> bool:
    return x is None


def _all_kept(leaf: Any) -> jax.Array:
    """An all-True mask of ``leaf``'s shape, sharded like ``leaf``."""
    if isinstance(leaf, jax.Array) and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jnp.ones_like(leaf, dtype=bool)
    return jnp.ones(np.shape(leaf), bool)


def _zero_pruned(x: Any, mk: Any, only_if: jax.Array | None = None) -> Any:
    """``where(mk, x, 0)``; ``x`` unchanged without a mask of its shape.

    With ``only_if`` (a traced bool scalar) every entry is kept where it is
    False: ``where(mk | ~only_if, x, 0)``, one fused select instead of a
    ``lax.cond`` that would copy ``x``. An 8-bit moment
    (:class:`BlockQuantizedArray`) gets code 0 at pruned positions: zero for
    first moments, the smallest representable root for second moments (whose
    gradients are masked to zero from then on).
    """
    if not hasattr(mk, "shape") or isinstance(x, optax.MaskedNode):
        return x  # no mask (None, or a Variable around None), or no state (optax.masked)
    if isinstance(x, BlockQuantizedArray):
        return zero_where(x, mk if only_if is None else mk | ~only_if)
    if np.shape(x) != mk.shape:
        return x
    return jnp.where(mk if only_if is None else mk | ~only_if, x, jnp.zeros((), x.dtype))


def straight_through(params: PyTree, masks: PyTree) -> PyTree:
    r"""Masked weights whose gradient is the dense one (straight-through estimator).

    .. math::

      \tilde w = w + \operatorname{stop\_gradient}(w \odot m - w), \qquad
      \partial L / \partial w = \partial L / \partial \tilde w

    The forward value is exactly ``where(m, w, 0)``. Use it inside the loss
    with ``prune(..., method='ste')``'s ``state.masks``.

    Args:
      params: parameter pytree.
      masks: bool masks (or the bit-packed masks of ``prune(packed=True)``),
        a tree like ``params`` (``None`` leaves pass through).

    Returns:
      ``params`` with pruned weights exactly 0.0 in the forward pass.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> w, m = {'w': jnp.array([1., -2.])}, {'w': jnp.array([True, False])}
      >>> straight_through(w, m)['w'], jax.grad(lambda p: straight_through(p, m)['w'].sum())(w)['w']
      (Array([1., 0.], dtype=float32), Array([1., 1.], dtype=float32))

    References:
      Bengio, Leonard, Courville, "Estimating or Propagating Gradients
      Through Stochastic Neurons", https://arxiv.org/abs/1308.3432, 2013.
    """

    def forward(p: Any, mk: Any) -> Any:
        if mk is None:
            return p
        mk = _unpack(mk, p) if mk.dtype == jnp.uint8 else mk
        return p + jax.lax.stop_gradient(jnp.where(mk, p, jnp.zeros((), p.dtype)) - p)

    return jax.tree.map(forward, params, masks)


def _pack(mask: jax.Array) -> jax.Array:
    """Bits of ``mask`` as ``uint8``; a scalar stays bool.

    Flat, as :func:`pack_masks` (``ceil(size / 8)`` bytes); a mask sharded on
    an explicit mesh is packed along its first axis instead, which keeps the
    sharding of its other axes.
    """
    if mask.ndim == 0:
        return mask
    spec = _explicit_spec(mask)
    if spec is not None and len(spec) and spec[0] is not None:
        mask = jax.sharding.reshard(mask, P(None, *spec[1:]))  # packing regroups axis 0
    # One layout per rank, so unpacking can tell them apart: a 1-D mask is
    # always flat (its bits along axis 0 would be in another bit order).
    if spec is None or mask.ndim == 1:
        return _pack_flat(mask)
    return jnp.packbits(mask, axis=0)


def _unpack(bits: jax.Array | None, leaf: Any) -> jax.Array | None:
    """Inverse of :func:`_pack` for a leaf like ``leaf`` (the layout from ``bits.ndim``)."""
    if bits is None or bits.ndim == 0:
        return bits
    shape = np.shape(leaf)
    if bits.ndim == len(shape) > 1:  # packed along the first axis (explicit mesh)
        return _like(jnp.unpackbits(bits, axis=0, count=shape[0]).astype(bool), leaf)
    return _like(_unpack_flat(bits, shape), leaf)


def _identity(x: Any) -> Any:
    return x


def _identity2(x: Any, _: Any) -> Any:
    return x


def _as_schedule(schedule: Any) -> SparsitySchedule:
    """A :class:`SparsitySchedule` from ``prune``'s ``schedule`` argument."""
    if isinstance(schedule, SparsitySchedule):
        return schedule
    if _is_number(schedule):
        _check_unit_interval("schedule", schedule, arrays=False)
        return constant(float(schedule))
    if isinstance(schedule, (jax.Array, np.ndarray)) and np.ndim(schedule) == 0:
        # A scalar array, e.g. from optax.inject_hyperparams: masks are
        # recomputed at this sparsity on every step, as constant(s) does.
        _check_unit_interval("schedule", schedule)  # its value, unless traced
        return SparsitySchedule(
            lambda t: jnp.asarray(schedule, jnp.float32),
            lambda t: jnp.ones((), bool),
            math.nan,
        )
    raise TypeError(
        "schedule must be a SparsitySchedule (polynomial_schedule, one_shot, constant), "
        f"a number or a scalar array; got schedule={schedule!r}"
    )


def _check_static_int(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
        raise TypeError(
            f"{name} must be an int; got {name}={value!r} (with optax.inject_hyperparams, "
            f"list {name!r} in static_args)"
        )


def prune(
    schedule: SparsitySchedule | float | jax.Array | None,
    *,
    method: str = "magnitude",
    scope: str = "layer",
    where: tree_lib.Where = None,
    distribution: str | None = None,
    n: int | None = None,
    m: int | None = None,
    axis: int | None = None,
    norm: int | None = None,
    key: jax.Array | None = None,
    inner: optax.GradientTransformation | None = None,
    block: tuple[int, int] | None = None,
    normalize: bool = False,
    packed: bool = False,
    masks: PyTree | None = None,
    update_fraction: float | jax.Array | None = None,
    update_end: int | None = None,
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

    Methods: ``'magnitude'`` (smallest ``|w|``), ``'saliency'`` (smallest
    ``|w * g|`` with the gradients ``g`` of the step, so it needs ``inner``:
    :func:`saliency_masks`), ``'random'`` (fixed random
    scores from ``key``, so masks are nested as sparsity grows),
    ``'structured'`` (whole channels along ``axis`` by ``norm``; sparsity
    counts channels) and ``'nm'``: the smallest candidates of
    :func:`nm_masks` are pruned up to ``schedule(t)``, so every group keeps
    at least ``n`` weights throughout and the mask is exactly N:M when the
    schedule reaches ``(m - n) / m``. ``'static'`` trains at fixed ``masks``
    (e.g. a lottery ticket: masks of a trained model applied to the
    rewound initial weights), applied from the first step on; it takes
    ``schedule=None`` and the selection from ``masks``.

    ``'ste'`` (straight-through estimator, Bengio et al. 2013; as jaxpruner's
    ``SteMagnitudePruning``) keeps training the dense weights: updates are
    not masked, the magnitude masks are recomputed on the schedule (a pruned
    weight can come back), and the forward pass uses
    :func:`straight_through` ``(params, state.masks)``: exactly zero at pruned
    positions, with the dense gradient. Export with
    ``apply_masks(params, state.masks)`` for exact zeros.

    Dynamic sparse training, ``'set'`` (Mocanu et al. 2018) and ``'rigl'``
    (Evci et al. 2020), trains sparse from scratch: ``init`` draws random
    masks at ``schedule(0)`` (ERK per-leaf sparsities by default, from
    ``key``), and on each later update step before ``update_end`` every leaf
    drops the ``round(f_t * active)`` kept weights of smallest ``|w|`` and
    grows as many among the others: at random (SET) or of largest gradient
    ``|g|`` (RigL, which needs ``inner``), so the sparsity stays exact. Grown
    weights start at exactly 0.0 (and zero moments). The fraction decays as
    :math:`f_t = \frac{f}{2}(1 + \cos(\pi t / T_{end}))` with
    ``update_fraction`` :math:`f` and ``update_end`` :math:`T_{end}`
    (constant without ``update_end``); use e.g. ``constant(0.9,
    frequency=100)`` as the schedule.

    With ``inner=tx``, ``prune`` wraps the optimizer: on a mask update the
    masks are recomputed first (from the weights and the raw gradients), then
    ``tx``'s parameter-shaped state (e.g. Adam moments) is zeroed at the newly
    pruned positions, and the gradients are masked with the step's masks
    before ``tx`` sees them, so the moments of pruned weights stay exactly
    zero and pruned weights do not regrow. Between mask updates ``tx``'s
    state is left exactly as ``tx`` makes it, and only the masks pass
    through the ``lax.cond`` of the mask update (its keep-branch copies what
    it returns).

    The state holds one bool mask per leaf of ``params`` (all True where
    ``where`` selects nothing), so it maps like params:
    ``optax.tree.map_params`` (whose placeholder tree ``init`` accepts) and
    :func:`jaxopt_nn.parallel.state_shardings` give each mask its
    parameter's sharding. Every method runs under meshes with explicit axes
    (``jax.make_mesh(..., axis_types=Explicit)`` and ``jax.set_mesh``): the
    selection counts without reshaping or sorting sharded axes (N:M groups are
    formed on a gathered copy), and masks come out sharded like their leaf.

    With ``optax.inject_hyperparams(prune)(s)`` the sparsity ``s`` (a number,
    or a schedule that inject_hyperparams evaluates) arrives as a scalar
    array: masks are then recomputed at that sparsity on every step, as with
    ``constant(s)``, and ``state.hyperparams['schedule']`` can be changed
    between steps. To keep a :class:`SparsitySchedule`'s own update steps,
    pass ``static_args='schedule'``. ``n``, ``m``, ``axis``, ``norm`` and
    ``update_end`` must be Python ints (name those you pass in
    ``static_args``), and so must a callable ``where``, which
    inject_hyperparams would take for a schedule. With bfloat16 or float16
    params also pass ``hyperparam_dtype=jnp.float32``: inject_hyperparams
    otherwise casts the sparsity to the params' dtype (0.9 becomes 0.898).

    Args:
      schedule: a :class:`SparsitySchedule` (:func:`polynomial_schedule`,
        :func:`one_shot`, :func:`constant`), a number (``constant``) or a
        scalar array (possibly traced; masks recomputed every step); ``None``
        with ``method='static'``.
      method: ``'magnitude'``, ``'random'``, ``'nm'`` or ``'structured'``.
      scope: ``'layer'`` or ``'global'`` (magnitude, random, nm).
      where: which leaves to prune; default: kernels.
      distribution: ``'uniform'`` (every leaf at ``schedule(t)``) or
        ``'erk'`` (per-leaf sparsities from :func:`erk`, layer scope,
        magnitude/random/set/rigl); default ``'erk'`` for set and rigl,
        ``'uniform'`` otherwise.
      n: weights kept per group (``method='nm'``).
      m: group size (``method='nm'``).
      axis: group axis (nm) or channel axis (structured); default ``-1``.
      norm: 1 or 2 (structured); default 2.
      key: PRNG key (``method='random'``).
      inner: optional optimizer to wrap with gradient masking (required by
        ``method='saliency'``, whose scores need the raw gradients). Any
        optax transform, including ``optax.masked`` / ``multi_transform``
        states; extra arguments of ``update`` (e.g. ``value=``) reach it.
      block: ``(bh, bw)`` block sparsity for magnitude and saliency (see
        :func:`magnitude_masks`).
      normalize: per-leaf score normalisation for magnitude and saliency.
      update_fraction: :math:`f` in ``(0, 1]``, the fraction of kept weights
        dropped and regrown per update (set, rigl; ``None``: 0.3).
      update_end: step from which masks stay fixed (set, rigl); also the
        end of the cosine decay of ``update_fraction``.
      masks: the fixed masks of ``method='static'``, a tree like ``params``
        with bool arrays (``True`` = kept) at pruned leaves and ``None``
        elsewhere, as the ``*_masks`` functions return.
      packed: store the masks bit-packed (``uint8``, 8 weights per byte,
        flat as :func:`pack_masks`, so :func:`unpack_masks` restores them;
        leaves that are never pruned hold a scalar ``True``), at most 1/8 of
        the bool state plus one byte per leaf; they are unpacked inside the
        step. A leaf sharded on an explicit mesh is packed along its first
        axis instead (``jnp.unpackbits(mask, axis=0, count=len)`` restores
        it), sharded like the leaf except along that axis. Default ``False``:
        bool masks keep each parameter's shape and sharding, which state
        sharding rules for params rely on.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`PruneState`. ``update`` needs ``params``.

    Raises:
      ValueError: for an unknown ``method``/``scope``/``distribution``, a
        missing or invalid ``n``/``m``/``key``/``norm``, an N:M schedule that
        does not end at ``(m - n) / m``, or (at ``init``) a ``where`` that
        selects nothing or ``m`` not dividing the axis length.
      TypeError: for a ``schedule`` of another type, or an ``axis``/``norm``
        that is not an int.

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
      for Efficient Neural Networks", https://arxiv.org/abs/1506.02626, 2015;
      Mocanu et al., "Scalable training of artificial neural networks with
      adaptive sparse connectivity inspired by network science", Nature
      Communications, 2018 (SET); Evci, Gale, Menick, Castro, Elsen, "Rigging
      the Lottery: Making All Tickets Winners", ICML 2020,
      https://arxiv.org/abs/1911.11134 (RigL, Algorithm 1 and Equation 1).
    """
    _check_choice("method", method, _METHODS)
    if method == "static":
        if schedule is not None or masks is None or where is not None:
            raise ValueError(
                "method='static' takes schedule=None, where=None and a mask tree as masks=; "
                f"got schedule={schedule!r}, where={where!r}, masks of type {type(masks).__name__}"
            )
        schedule = SparsitySchedule(
            lambda t: jnp.zeros((), jnp.float32), lambda t: jnp.zeros((), bool), math.nan
        )
    elif masks is not None:
        raise ValueError(f"masks is only used by method='static'; got method={method!r}")
    schedule = _as_schedule(schedule)
    _check_choice("scope", scope, _SCOPES)
    if distribution is None:
        distribution = "erk" if method in _DYNAMIC else "uniform"
    _check_choice("distribution", distribution, _DISTRIBUTIONS)
    _check_static_int("axis", axis)
    _check_static_int("norm", norm)
    for name, value in (("packed", packed), ("normalize", normalize)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool; got {name}={value!r}")
    # An argument the method does not read is refused rather than ignored.
    for name, value, users in (
        ("axis", axis, ("nm", "structured")),
        ("norm", norm, ("structured",)),
        ("update_fraction", update_fraction, _DYNAMIC),
        ("update_end", update_end, _DYNAMIC),
    ):
        if value is not None and method not in users:
            raise ValueError(
                f"{name} is only used by method {' or '.join(map(repr, users))}; "
                f"got {name}={value!r} with method={method!r}"
            )
    update_fraction = 0.3 if update_fraction is None else update_fraction
    axis = -1 if axis is None else axis
    norm = 2 if norm is None else norm
    if method == "nm":
        _check_static_int("n", n)
        _check_static_int("m", m)
        _check_nm(n, m)
        assert isinstance(n, int) and isinstance(m, int)  # checked just above
        final = schedule.final_sparsity
        if not math.isnan(final) and not math.isclose(final, (m - n) / m, abs_tol=1e-6):
            raise ValueError(
                f"method='nm' with n={n}, m={m} needs a schedule ending at (m - n) / m = "
                f"{(m - n) / m}; got final_sparsity={final}"
            )
    elif n is not None or m is not None:
        raise ValueError(f"n and m are only used by method='nm'; got method={method!r}")
    if method in ("random", *_DYNAMIC) and key is None:
        raise ValueError(f"key must be a PRNG key (jax.random.key) when method={method!r}")
    if method not in ("random", *_DYNAMIC) and key is not None:
        raise ValueError(
            f"key is only used by method 'random', 'set', 'rigl'; got method={method!r}"
        )
    if method in _DYNAMIC:
        if scope != "layer":
            raise ValueError(f"scope must be 'layer' with method={method!r}; got scope={scope!r}")
        if _is_number(update_fraction) and not 0.0 < float(update_fraction) <= 1.0:
            raise ValueError(
                f"update_fraction must lie in (0, 1]; got update_fraction={update_fraction!r}"
            )
        if update_end is not None:
            _check_static_int("update_end", update_end)
            _check_step("update_end", update_end, 1)
    if method == "rigl" and inner is None:
        raise ValueError(
            "method='rigl' grows by gradient magnitude: pass the optimizer as inner=; "
            "got inner=None"
        )
    if method == "structured" and scope != "layer":
        raise ValueError(f"scope must be 'layer' with method='structured'; got scope={scope!r}")
    if method == "structured" and norm not in (1, 2):
        raise ValueError(f"norm must be 1 or 2; got norm={norm!r}")
    if method == "saliency" and inner is None:
        raise ValueError(
            "method='saliency' needs the raw gradients: pass the optimizer as inner=; "
            "got inner=None"
        )
    _check_block(block)
    if (block is not None or normalize) and method not in ("magnitude", "saliency", "ste"):
        raise ValueError(
            "block and normalize apply to method 'magnitude', 'saliency' or 'ste'; "
            f"got method={method!r}"
        )
    if distribution == "erk" and (
        scope != "layer" or method not in ("magnitude", "random", *_DYNAMIC)
    ):
        raise ValueError(
            "distribution='erk' needs scope='layer' and method 'magnitude', 'random', 'set' or "
            f"'rigl'; got scope={scope!r}, method={method!r}"
        )
    # Extra arguments of the chain (e.g. value= for reduce_on_plateau) reach
    # inner, which may be a plain GradientTransformation.
    inner = None if inner is None else optax.with_extra_args_support(inner)

    def drop_and_grow(
        named: list[tuple[str, Any]], old: list[jax.Array], grads: list[Any], step: jax.Array
    ) -> list[jax.Array]:
        """Drop the smallest active |w|, grow as many (largest |g| or random), per leaf."""
        fraction = jnp.asarray(update_fraction, jnp.float32)
        if update_end is not None:  # cosine decay to 0 at update_end (Evci et al., Eq. 1)
            progress = jnp.minimum(step, update_end).astype(jnp.float32) / update_end
            fraction = fraction * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        active = jnp.stack([_count(mk) for mk in old])
        ks = jnp.round(fraction * active.astype(jnp.float32)).astype(jnp.int32)
        weights = [jnp.abs(jnp.asarray(leaf)) for _, leaf in named]
        drop = _select_lowest(weights, ks, old, scope="layer")
        after = [mk & ~d for mk, d in zip(old, drop, strict=True)]
        if method == "rigl":
            scores = [jnp.abs(jnp.asarray(g)) for g in grads]
        else:
            step_key = jax.random.fold_in(key, step)  # type: ignore[arg-type]
            scores = [
                jax.random.uniform(jax.random.fold_in(step_key, i), w.shape)
                for i, w in enumerate(weights)
            ]
        grow = _select_lowest(scores, ks, [~a for a in after], scope="layer", highest=True)
        return [_like(a | g, leaf) for a, g, (_, leaf) in zip(after, grow, named, strict=True)]

    def compute_masks(
        named: list[tuple[str, Any]], sparsity: Any, grads: list[Any]
    ) -> list[jax.Array]:
        """Masks of the selected leaves ``named`` at ``sparsity``."""
        leaves = [leaf for _, leaf in named]
        sparsities = [sparsity] * len(named)
        if distribution == "erk":
            values = _erk_sparsities([np.shape(leaf) for leaf in leaves], sparsity, 1.0)
            sparsities = [values[i] for i in range(len(named))]
        if method in ("magnitude", "saliency", "ste"):
            scores = (
                _saliency(named, grads)
                if method == "saliency"
                else [jnp.abs(jnp.asarray(leaf)) for leaf in leaves]
            )
            return _by_score(named, scores, sparsities, scope, block, normalize)
        if method in ("random", *_DYNAMIC):  # the initial masks of set/rigl are random
            return _random(key, leaves, sparsities, scope)  # type: ignore[arg-type]
        if method == "nm":
            return _nm(named, n, m, axis, sparsity, scope)  # type: ignore[arg-type]
        if method == "static":
            return [
                _like(jnp.asarray(mk, bool), leaf)
                for mk, leaf in zip(jax.tree.leaves(masks), leaves, strict=True)
            ]
        return _structured(named, sparsities, axis, norm)

    def selected(params: optax.Params) -> tuple[PyTree, list[tuple[str, Any]]]:
        if method != "static":
            return _selected_leaves(params, where)
        flags = jax.tree.map(lambda _, mk: mk is not None, params, masks)
        flags, named = _selected_leaves(params, flags)
        for (name, leaf), mk in zip(named, jax.tree.leaves(masks), strict=True):
            if np.shape(mk) != np.shape(leaf):
                raise ValueError(
                    f"masks must have the shape of their leaf; got {np.shape(mk)} for leaf "
                    f"{name!r} of shape {np.shape(leaf)}"
                )
        return flags, named

    store = _pack if packed else _identity
    load = _unpack if packed else _identity2

    def check(params: optax.Params) -> list[jax.Array]:
        _, named = selected(params)
        return compute_masks(named, 0.0, [leaf for _, leaf in named])

    def init_fn(params: optax.Params) -> PruneState:
        inner_state = optax.EmptyState() if inner is None else inner.init(params)
        # optax.tree.map_params calls init on a placeholder tree without leaves.
        if jax.tree.leaves(params):
            # Runs every shape check (selection, axis, m | length) without computing.
            jax.eval_shape(check, params)
        kept = jax.tree.map(_all_kept, params)
        if jax.tree.leaves(params):
            flags, named = selected(params)
            if method in ("static", *_DYNAMIC):
                fixed = iter(compute_masks(named, schedule(0), []))
                kept = jax.tree.map(lambda flag, mk: next(fixed) if flag else mk, flags, kept)
            if packed:  # a leaf that is never pruned holds a scalar True
                kept = jax.tree.map(
                    lambda flag, mk: mk if flag else jnp.ones((), bool), flags, kept
                )
        return PruneState(jnp.zeros((), jnp.int32), jax.tree.map(store, kept), inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("prune needs params: call update(updates, state, params)")
        flags, named = selected(params)
        # The stored masks of selected leaves, None elsewhere (nothing to apply there).
        stored = jax.tree.map(lambda flag, mk: mk if flag else None, flags, state.masks)
        grads = [
            g
            for g, flag in zip(jax.tree.leaves(updates), jax.tree.leaves(flags), strict=True)
            if flag
        ]
        before = jax.tree.map(load, stored, params, is_leaf=_is_none)
        is_update = schedule.is_update_step(state.count)
        if method in _DYNAMIC:  # masks come from init; drop-and-grow until update_end
            is_update = is_update & (state.count > 0)
            if update_end is not None:
                is_update = is_update & (state.count < update_end)

        # Stored apart from the masks applied: packed, or holding grown weights.
        apart = packed or method in _DYNAMIC

        def refresh(_):
            if method in _DYNAMIC:
                new = drop_and_grow(named, jax.tree.leaves(before), grads, state.count)
            else:
                new = compute_masks(named, schedule(state.count), grads)
            masks = _unflatten(flags, params, new)
            # Grown weights start at exactly zero: this step keeps only the
            # surviving old entries (the stored masks hold the grown ones).
            active = (
                jax.tree.map(lambda mk, old: mk & old, masks, before)
                if method in _DYNAMIC
                else masks
            )
            return active, jax.tree.map(store, masks) if apart else None

        # Only the masks pass through the cond: the branch that keeps them copies
        # each operand it returns, so carrying the optimizer state would copy it
        # on every step (and split its fused update). The cond also returns the
        # unpacked masks: no second unpacking.
        # SET's cond waits for the gradients as RigL's does (see _after); only
        # its predicate does, not the moment updates that read is_update.
        gate = is_update & _after(grads) if method == "set" and grads else is_update
        active, fresh = jax.lax.cond(
            gate, refresh, lambda _: (before, stored if apart else None), None
        )
        stored = fresh if apart else active
        inner_state = state.inner_state
        if inner is not None and method != "ste":  # STE trains the dense weights
            # Before ``inner`` runs, its parameter-shaped state is zeroed where
            # this step's masks prune (on mask updates; on other steps every
            # entry is kept as is) and the gradients are masked: the moments
            # of pruned weights stay exactly zero, and the zeroing fuses with
            # the optimizer's own update.
            inner_state = optax.tree_map_params(
                inner,
                lambda x, mk: _zero_pruned(x, mk, is_update),
                inner_state,
                active,
                # optax.masked / multi_transform hold a MaskedNode where the
                # masks tree holds a leaf or None.
                is_leaf=lambda x: isinstance(x, (BlockQuantizedArray, optax.MaskedNode)),
            )
            updates = jax.tree.map(_zero_pruned, updates, active)
        if inner is not None:
            updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
        if method != "ste":
            updates = jax.tree.map(
                lambda u, p, mk: u if mk is None else jnp.where(mk, u, -p), updates, params, active
            )
        masks = jax.tree.map(
            lambda mk, old: old if mk is None else mk, stored, state.masks, is_leaf=_is_none
        )
        count: jax.Array = optax.safe_increment(state.count)  # pyright: ignore[reportAssignmentType]
        return updates, PruneState(count, masks, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _after(arrays: list[Any]) -> jax.Array:
    """``True``, computed from the first element of each array.

    A predicate ``&``-ed with it makes the ``lax.cond`` it gates wait for the
    arrays. SET's drop-and-grow reads no gradient, so without it XLA on CPU
    schedules the cond during the forward pass and interleaves the optimizer's
    moment updates with the backward pass, which measured slower than RigL's
    order (its cond reads the gradients) on the same bytes. Bit patterns, not
    values, so a non-finite gradient changes nothing. Arrays sharded on a mesh
    with explicit axes are left out (such a mesh has no one-element slice of a
    sharded axis).
    """
    flags = [jnp.bool_(True)]
    for x in arrays:
        if not x.size or _explicit_spec(x) is not None:  # no slices of explicit shards
            continue
        first = x[(0,) * x.ndim]
        unsigned = jnp.dtype(f"uint{8 * first.dtype.itemsize}")
        sign = jax.lax.shift_right_logical(
            jax.lax.bitcast_convert_type(first, unsigned), unsigned.type(8 * unsigned.itemsize - 1)
        )
        flags.append(jax.lax.shift_right_logical(sign, unsigned.type(1)) == 0)
    return jnp.stack(flags).all()


_SCHEDULES: dict[str, Callable[..., SparsitySchedule]] = {
    "polynomial": polynomial_schedule,
    "one_shot": one_shot,
    "constant": constant,
}
_CONFIG_KEYS = (
    "method",
    "scope",
    "distribution",
    "n",
    "m",
    "axis",
    "norm",
    "normalize",
    "packed",
    "update_fraction",
    "update_end",
)


def pruner_from_config(
    config: Mapping[str, Any],
    *,
    inner: optax.GradientTransformation | None = None,
    where: tree_lib.Where = None,
    masks: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    """A :func:`prune` transform from a plain dict (JSON/YAML sweeps).

    The dict holds ``prune``'s keyword arguments that are plain values
    (``method``, ``scope``, ``distribution``, ``n``, ``m``, ``axis``,
    ``norm``, ``normalize``, ``packed``, ``update_fraction``,
    ``update_end``), ``block`` as a list ``[bh, bw]``, ``seed`` (an int, for
    the ``key`` of random/set/rigl) and exactly one of ``sparsity`` (a number:
    :func:`constant`) and ``schedule``: ``{'type': 'polynomial' | 'one_shot'
    | 'constant', ...}`` with the keyword arguments of that schedule. Objects
    that are no plain values (``inner``, ``where``, static ``masks``) are
    keyword arguments here.

    Args:
      config: the dict.
      inner: optimizer to wrap (saliency, rigl need one).
      where: which leaves to prune.
      masks: fixed masks of ``method='static'``.

    Returns:
      The transform ``prune(...)`` builds.

    Raises:
      ValueError: for an unknown key or schedule type, schedule arguments
        that do not fit it, a missing or doubled sparsity, or anything
        :func:`prune` refuses.
      TypeError: for a config, schedule, sparsity or seed of the wrong type.

    Example:
      >>> tx = pruner_from_config({
      ...     'method': 'magnitude', 'scope': 'global',
      ...     'schedule': {'type': 'polynomial', 'final_sparsity': 0.9,
      ...                  'begin_step': 0, 'end_step': 100, 'frequency': 10}})
      >>> type(tx).__name__
      'GradientTransformationExtraArgs'
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (a dict); got config={config!r}")
    allowed = {*_CONFIG_KEYS, "block", "seed", "sparsity", "schedule"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; allowed: {sorted(allowed)}")
    given = ("sparsity" in config) + ("schedule" in config)
    if given != (config.get("method") != "static"):
        raise ValueError(
            "config must hold exactly one of 'sparsity' and 'schedule' (neither with "
            f"method 'static'); got keys {sorted(config)}"
        )
    schedule: Any = config.get("sparsity")
    if "sparsity" in config:
        _check_unit_interval("config['sparsity']", schedule)
    if "schedule" in config:
        if not isinstance(config["schedule"], Mapping):
            raise TypeError(
                "config['schedule'] must be a mapping with a 'type' and that schedule's "
                f"arguments; got config['schedule']={config['schedule']!r}"
            )
        spec = dict(config["schedule"])
        kind = spec.pop("type", None)
        _check_choice("config['schedule']['type']", kind, list(_SCHEDULES))
        factory = _SCHEDULES[kind]
        signature = inspect.signature(factory)
        try:
            signature.bind(**spec)
        except TypeError as err:
            takes = [
                name if p.default is p.empty else f"{name}={p.default!r}"
                for name, p in signature.parameters.items()
            ]
            raise ValueError(
                f"config['schedule'] of type {kind!r} takes {', '.join(takes)} ({err}); "
                f"got config['schedule']={config['schedule']!r}"
            ) from None
        schedule = factory(**spec)
    kwargs = {k: config[k] for k in _CONFIG_KEYS if k in config}
    if "block" in config:  # a JSON list; anything else reaches prune's own check
        block = config["block"]
        kwargs["block"] = tuple(block) if isinstance(block, (list, tuple)) else block
    if "seed" in config:
        seed = config["seed"]
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"config['seed'] must be an int; got config['seed']={seed!r}")
        kwargs["key"] = jax.random.key(seed)
    return prune(schedule, inner=inner, where=where, masks=masks, **kwargs)
