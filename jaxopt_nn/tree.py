"""Pytree helpers shared by every transform: ``where`` selection, path names, sizes.

Every transform in jaxopt_nn chooses the leaves it touches with one argument,
``where``:

* ``None`` (default): floating-point leaves with ``ndim >= 2`` (kernels).
  Biases, norm scales and integer leaves are left alone.
* a callable ``(path, leaf) -> bool`` where ``path`` is the readable name of
  the leaf (``'params/Dense_0/kernel'``, ``'layers/0/kernel'``);
* a pytree of Python bools with the structure of the params, or a prefix of
  it (a bool at an inner node applies to every leaf below it).

The same functions accept Linen ``{'params': ...}`` dicts, NNX ``nnx.State``
(whose leaves sit behind a ``.value`` attribute, which the names omit) and
plain nested dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Where = Callable[[str, Any], bool] | PyTree | None

# Attribute keys that wrap a leaf without naming it (NNX Variables).
_VARIABLE_ATTRS = frozenset({"value", "raw_value"})


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_name(path: Sequence[Any]) -> str:
    """Readable name of a key path, e.g. ``'params/Dense_0/kernel'``.

    Args:
      path: a key path from ``jax.tree_util.tree_flatten_with_path``.

    Returns:
      The keys joined with ``'/'``; a trailing NNX ``.value`` is dropped so
      that ``nnx.State`` and the pure dict of the same model share names.

    Example:
      >>> import jax
      >>> tree = {'Dense_0': {'kernel': 1.0}, 'layers': [{'kernel': 2.0}]}
      >>> [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
      ['Dense_0/kernel', 'layers/0/kernel']
    """
    keys = list(path)
    while (
        keys
        and isinstance(keys[-1], jax.tree_util.GetAttrKey)
        and (keys[-1].name in _VARIABLE_ATTRS)
    ):
        keys.pop()
    return "/".join(_key_name(k) for k in keys)


def leaves_with_names(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(name, leaf), ...]`` in ``jax.tree.leaves`` order (``None`` is no leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_name(p), leaf) for p, leaf in flat]


def map_with_names(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map`` whose function also receives the leaf's readable name."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_name(p), *xs), tree, *rest)


def is_kernel(leaf: Any) -> bool:
    """The default selection: a floating-point array with ``ndim >= 2``."""
    return (
        hasattr(leaf, "dtype")
        and hasattr(leaf, "ndim")
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.ndim >= 2
    )


def select(tree: PyTree, where: Where = None) -> PyTree:
    """Pytree of Python bools saying which leaves of ``tree`` are selected.

    Args:
      tree: a parameter pytree.
      where: ``None`` (kernels: floating, ``ndim >= 2``), a callable
        ``(path_name, leaf) -> bool``, or a pytree of bools with the structure
        of ``tree`` or a prefix of it.

    Returns:
      A pytree with the structure of ``tree`` holding ``True``/``False``.

    Raises:
      TypeError: if ``where`` is a pytree whose structure is not a prefix of
        ``tree``'s, or holds something other than bools.
    """
    if where is None:
        return jax.tree.map(is_kernel, tree)
    if isinstance(where, type):  # e.g. nnx.Param, a filter of nnx.state, not a predicate
        raise TypeError(
            "where must be None, a callable (path, leaf) -> bool, or a pytree of bools; "
            f"got the class where={where.__name__}: filter the state first (nnx.state(model, "
            f"{where.__name__})) or pass e.g. lambda path, leaf: path.endswith('kernel')"
        )
    if callable(where):
        return map_with_names(lambda name, leaf: bool(where(name, leaf)), tree)

    def broadcast(flag: Any, subtree: PyTree) -> PyTree:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"where must hold Python bools; got {type(flag).__name__} {flag!r}")
        return jax.tree.map(lambda _: bool(flag), subtree)

    try:
        return jax.tree.map(broadcast, where, tree)
    except ValueError as err:
        raise TypeError(
            "where must be None, a callable (path, leaf) -> bool, or a pytree of bools "
            f"whose structure is a prefix of the params'; got where={where!r}"
        ) from err


def selected_names(tree: PyTree, where: Where = None) -> list[str]:
    """Names of the selected leaves, in tree order."""
    flags = jax.tree.leaves(select(tree, where))
    return [name for (name, _), flag in zip(leaves_with_names(tree), flags, strict=True) if flag]


def values_by_name(mapping: Mapping[str, Any], names: Sequence[str], what: str) -> list[Any]:
    """``[mapping[n] for n in names]``, refusing a mapping that misses or adds names.

    Args:
      mapping: leaf name -> value, e.g. a per-leaf sparsity or bit width.
      names: the selected leaves' names, in tree order.
      what: the argument's name and what it maps to, for the message.

    Raises:
      ValueError: naming the missing and the unselected names.
    """
    missing = [name for name in names if name not in mapping]
    extra = [name for name in mapping if name not in names]
    if missing or extra:
        raise ValueError(
            f"{what} must map every selected leaf name to a value; "
            f"missing {missing}, not selected {extra}"
        )
    return [mapping[name] for name in names]


def map_selected(
    fn: Callable[..., Any], tree: PyTree, *rest: PyTree, where: Where = None
) -> PyTree:
    """Apply ``fn(leaf, *rest_leaves)`` to selected leaves; others pass through.

    Args:
      fn: function of the selected leaf (and the matching leaves of ``rest``).
      tree: the pytree whose leaves are selected by ``where``.
      *rest: pytrees with the same structure as ``tree``.
      where: the selection (see :func:`select`).

    Returns:
      A pytree like ``tree``: ``fn`` applied where selected, the leaf of
      ``tree`` unchanged elsewhere.
    """
    flags = select(tree, where)
    return jax.tree.map(lambda flag, leaf, *xs: fn(leaf, *xs) if flag else leaf, flags, tree, *rest)


def count_params(tree: PyTree, where: Where | bool = True) -> int:
    """Number of scalars in the leaves of ``tree``.

    Args:
      tree: a pytree of arrays.
      where: ``True`` (default) counts every leaf; otherwise a selection as in
        :func:`select` (``None`` counts kernels only).

    Example:
      >>> import jax.numpy as jnp
      >>> count_params({'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)})
      16
    """
    leaves = jax.tree.leaves(tree)
    if where is not True:
        flags = jax.tree.leaves(select(tree, where))
        leaves = [leaf for leaf, flag in zip(leaves, flags, strict=True) if flag]
    return sum(math.prod(np.shape(leaf)) for leaf in leaves)


class LeafSize(NamedTuple):
    """One row of :func:`size_summary`."""

    name: str  # readable path
    shape: tuple[int, ...]
    dtype: str
    size: int  # number of scalars
    nbytes: int  # size * itemsize
    selected: bool  # chosen by ``where``


def size_summary(tree: PyTree, where: Where = None) -> list[LeafSize]:
    """Per-leaf shape, dtype, scalar count and bytes, with the ``where`` flag.

    Example:
      >>> import jax.numpy as jnp
      >>> rows = size_summary({'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)})
      >>> [(r.name, r.size, r.nbytes, r.selected) for r in rows]
      [('b', 4, 16, False), ('w', 12, 48, True)]
    """
    flags = jax.tree.leaves(select(tree, where))
    rows = []
    for (name, leaf), flag in zip(leaves_with_names(tree), flags, strict=True):
        shape = tuple(np.shape(leaf))
        dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))
        size = math.prod(shape)
        rows.append(LeafSize(name, shape, dtype.name, size, size * dtype.itemsize, flag))
    return rows


_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?[%x]?|-|")


def _reads_as_number(cell: Any) -> bool:
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return True
    return isinstance(cell, str) and _NUMBER.fullmatch(cell) is not None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table with right-aligned numbers (for logs and doctests).

    A column is right-aligned when each of its non-empty cells is a number or
    reads as one (``'5.0%'``, ``'40.7x'``, ``'-'``).

    Example:
      >>> print(format_table(['name', 'size', 'kept'], [['w', 12, '50.0%'], ['b', 4, '']]))
      name  size   kept
      w       12  50.0%
      b        4
    """
    cells = [[str(h) for h in headers]] + [
        [f"{c:,}" if isinstance(c, int) and not isinstance(c, bool) else str(c) for c in row]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [
        bool(rows) and all(_reads_as_number(row[i]) for row in rows) for i in range(len(headers))
    ]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
