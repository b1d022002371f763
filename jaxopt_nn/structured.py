"""Structured pruning: remove whole channels, so the model gets smaller and faster.

Pruning masks save bytes but no time: a masked layer still multiplies its
zeros. Removing a channel for real means slicing every tensor it touches:
the producing kernel's output column, its bias, the batch-norm scale, shift
and running statistics, the consuming kernel's input rows, and, across a
residual add or a concatenation, the same channel of every other branch.
This module finds those coupled slices from the computation itself, not from
layer names (DepGraph, Fang et al. 2023):

1. :func:`dependency_groups` traces the NNX model on an example input
   (``nnx.split`` + ``jax.make_jaxpr``) and follows every channel through the
   primitives. Each element of each axis of each array in the jaxpr is a
   node; a primitive joins the elements that must be removed together
   (``add`` joins operand and result elements position by position,
   ``dot_general`` joins contracted axes, a concatenation joins each operand
   to its slice of the result, a flatten makes every result element the
   product of one element of each merged axis, ...). A set of joined elements
   that contains parameter entries and touches neither the model's input nor
   its output nor an axis a primitive mixes (a convolution window, a
   reduction over channels, a normalisation over features) is one removable
   channel; channels touching the same parameter axes the same number of
   times form a :class:`ChannelGroup`.
2. :func:`group_importance` scores every channel of every group.
3. :func:`shrink` slices all members of all groups at once and rebuilds the
   NNX model with the smaller arrays and its size attributes updated
   (``in_features``, ``out_features``, ``num_features``, ...).

:func:`prune_channels` does the three in one call; :func:`channel_masks`
gives the same choice as masks for gradual pruning during training, after
which :func:`shrink` removes the zeroed channels.

Primitives that are understood: element-wise arithmetic and comparisons,
``broadcast_in_dim``, ``reshape`` (merging or splitting axes), ``squeeze``,
``transpose``, ``rev``, ``dot_general``, ``conv_general_dilated`` (also
depthwise, ``feature_group_count`` equal to the input channels),
``concatenate``, ``split``, ``slice``, ``pad``, reductions, cumulative
reductions, pooling windows, ``select_n``, random bits, and the calls
``jit``/``pjit``, ``custom_jvp_call``, ``custom_vjp_call``, ``remat`` and
``cond`` (followed inside). Any other primitive raises
``NotImplementedError`` naming it, or with ``unsupported='exclude'`` warns
and leaves every axis it touches out of all groups.

What the trace cannot see: sizes hard-coded in the model's Python code (a
``reshape(batch, 4, 4, 50)``, a ``jnp.zeros(64)`` added to a channel) are
constants of the jaxpr; a hard-coded split of a channel axis is detected and
excluded, but a constant shape that only agrees with the current width
cannot be told from one derived from it. Models whose layer sizes come from
their parameters, as all Flax layers, shrink correctly.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_nn import train as train_lib
from jaxopt_nn import tree as tree_lib
from jaxopt_nn.data import Dataset

__all__ = [
    "ChannelGroup",
    "SlimStage",
    "Member",
    "channel_masks",
    "dependency_groups",
    "distillation_loss_fn",
    "gradual_prune",
    "group_importance",
    "keep_top",
    "prune_channels",
    "resized",
    "shrink",
]

CRITERIA = ("l1", "l2", "bn", "taylor")


class Member(NamedTuple):
    """One variable axis coupled to a group's channels.

    ``index`` is an int64 array ``(size, k)``: the ``k`` positions along
    ``axis`` of ``path`` that belong to each of the group's ``size`` channels.
    """

    path: str  # name of the variable, as tree.path_name gives it, e.g. 'fc1/kernel'
    axis: int  # the axis of that variable the channels live on
    index: np.ndarray  # pyright: ignore[reportIncompatibleMethodOverride]  # int64 (size, k)


class ChannelGroup(NamedTuple):
    """Channels that are removed together, and every variable axis they touch.

    Channel ``i`` of the group is the set of positions ``member.index[i]``
    along ``member.axis`` of ``member.path``, for every member. ``k`` (the
    second axis of ``index``) is 1 for the producer, biases, norms and most
    consumers; a dense layer after a flatten has ``k = height * width`` rows
    per convolution channel.
    """

    size: int  # number of channels
    members: tuple[Member, ...]  # sorted by variable order, then axis

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{m.path}[{m.axis}]" + (f"x{m.index.shape[1]}" if m.index.shape[1] > 1 else "")
            for m in self.members
        )
        return f"ChannelGroup(size={self.size}, members=({parts}))"


# ---------------------------------------------------------------------------
# Element graph: a union-find over the elements of every axis of every array.


class _Graph:
    """Union-find over axis elements, with blocked elements and products."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.blocked: set[int] = set()
        # product element -> (component elements, component axis sizes)
        self.products: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def block(self, *axes: np.ndarray) -> None:
        for a in axes:
            self.blocked.update(a.tolist())


Dims = list[np.ndarray]  # element ids per axis of one array


def _union_same(g: _Graph, a: np.ndarray, b: np.ndarray) -> None:
    """Join two axes position by position; a broadcast size-1 axis joins nothing."""
    if len(a) == len(b):
        g.union(a, b)


def _block_all(g: _Graph, ins: list[Dims | None], outs: list[Dims]) -> None:
    for dims in [*ins, *outs]:
        if dims is not None:
            g.block(*dims)


def _elementwise(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    for out in outs:
        for dims in ins:
            if dims is None or len(dims) != len(out):
                continue  # a scalar operand
            for a, b in zip(dims, out, strict=True):
                _union_same(g, a, b)


def _one_to_one(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    for dims, out in zip(ins, outs, strict=False):
        if dims is None:
            continue
        for a, b in zip(dims, out, strict=True):
            _union_same(g, a, b)


def _broadcast_in_dim(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    for i, d in enumerate(eqn.params["broadcast_dimensions"]):
        _union_same(g, src[i], out[d])


def _merge(g: _Graph, parts: list[np.ndarray], out: np.ndarray) -> None:
    """``out`` is the row-major flattening of ``parts``: each element is a product."""
    sizes = tuple(len(p) for p in parts)
    coords = np.unravel_index(np.arange(len(out)), sizes)
    for e, element in enumerate(out.tolist()):
        g.products[element] = (
            tuple(int(p[c[e]]) for p, c in zip(parts, coords, strict=True)),
            sizes,
        )


def _split(g: _Graph, src: np.ndarray, parts: list[np.ndarray]) -> None:
    """``src`` is split row-major into ``parts``: undoes an earlier merge, else excluded."""
    sizes = tuple(len(p) for p in parts)
    known = [g.products.get(int(e)) for e in src.tolist()]
    if any(k is None or k[1] != sizes for k in known):
        g.block(src, *parts)
        return
    coords = np.unravel_index(np.arange(len(src)), sizes)
    for e, (components, _) in enumerate(known):  # type: ignore[misc]
        for part, coord, comp in zip(parts, coords, components, strict=True):
            g.union(np.array([part[coord[e]]]), np.array([comp]))


def _reshape(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    if eqn.params.get("dimensions") is not None:
        _block_all(g, ins, outs)
        return
    a = [d for d in src if len(d) != 1]
    b = [d for d in out if len(d) != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        left, right = [a[i]], [b[j]]
        i, j = i + 1, j + 1
        while math.prod(map(len, left)) != math.prod(map(len, right)):
            if math.prod(map(len, left)) < math.prod(map(len, right)):
                left.append(a[i])
                i += 1
            else:
                right.append(b[j])
                j += 1
        if len(left) == 1 and len(right) == 1:
            g.union(left[0], right[0])
        elif len(right) == 1:
            _merge(g, left, right[0])
        elif len(left) == 1:
            _split(g, left[0], right)
        else:
            g.block(*left, *right)


def _squeeze(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    gone = {d % len(src) for d in eqn.params["dimensions"]}
    for a, b in zip([d for k, d in enumerate(src) if k not in gone], out, strict=True):
        g.union(a, b)


def _transpose(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    for i, p in enumerate(eqn.params["permutation"]):
        g.union(src[p], out[i])


def _rev(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    flipped = set(eqn.params["dimensions"])
    for k, (a, b) in enumerate(zip(src, out, strict=True)):
        g.union(a[::-1] if k in flipped else a, b)


def _dot_general(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    lhs, rhs = ins
    (out,) = outs
    if lhs is None or rhs is None:
        _block_all(g, ins, outs)
        return
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for a, b in zip(lc, rc, strict=True):
        g.union(lhs[a], rhs[b])
    k = 0
    for a, b in zip(lb, rb, strict=True):
        g.union(lhs[a], out[k])
        g.union(rhs[b], out[k])
        k += 1
    for operand, used in ((lhs, set(lc) | set(lb)), (rhs, set(rc) | set(rb))):
        for axis, dims in enumerate(operand):
            if axis not in used:
                g.union(dims, out[k])
                k += 1


def _conv(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    lhs, rhs = ins
    (out,) = outs
    if lhs is None or rhs is None:
        _block_all(g, ins, outs)
        return
    dn = eqn.params["dimension_numbers"]
    (ln, lf, *ls), (ro, ri, *rs), (on, of, *os_) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    g.block(*(lhs[a] for a in ls), *(rhs[a] for a in rs), *(out[a] for a in os_))
    g.union(lhs[ln], out[on])
    groups = eqn.params["feature_group_count"]
    if eqn.params["batch_group_count"] != 1:
        g.block(lhs[lf], rhs[ro], rhs[ri], out[of])
    elif groups == 1:
        g.union(lhs[lf], rhs[ri])
        g.union(rhs[ro], out[of])
    elif len(rhs[ri]) == 1:  # depthwise: output channel g * m + j reads input channel g
        g.block(rhs[ri])
        g.union(rhs[ro], out[of])
        multiplier = len(out[of]) // groups
        if multiplier == 1:
            g.union(lhs[lf], out[of])
        else:
            copies = g.new(multiplier)
            g.block(copies)
            _merge(g, [lhs[lf], copies], out[of])
    else:  # grouped convolution: groups must keep equal sizes
        g.block(lhs[lf], rhs[ro], rhs[ri], out[of])


def _reduce(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src = ins[0]
    if src is None:
        return
    axes = {a % len(src) for a in eqn.params["axes"]}
    g.block(*(src[a] for a in axes))
    for out in outs:
        for a, b in zip([d for k, d in enumerate(src) if k not in axes], out, strict=True):
            g.union(a, b)


def _cumulative(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    axis = eqn.params["axis"] % len(src)
    for k, (a, b) in enumerate(zip(src, out, strict=True)):
        if k == axis:
            g.block(a, b)
        else:
            g.union(a, b)


def _window(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    p = eqn.params
    rank = len(outs[0])
    ones = (1,) * rank
    trivial = [
        w == 1 and s == 1 and tuple(pad) == (0, 0) and bd == 1 and wd == 1
        for w, s, pad, bd, wd in zip(
            p["window_dimensions"],
            p["window_strides"],
            p["padding"],
            p.get("base_dilation") or ones,
            p.get("window_dilation") or ones,
            strict=True,
        )
    ]
    operands = [d for d in ins if d is not None and len(d) == rank]
    for out in outs:
        for src in operands:
            for a, b, keep in zip(src, out, trivial, strict=True):
                if keep:
                    g.union(a, b)
                else:
                    g.block(a, b)


def _concatenate(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    (out,) = outs
    axis = eqn.params["dimension"]
    offset = 0
    for dims in ins:
        if dims is None:
            continue
        for k, (a, b) in enumerate(zip(dims, out, strict=True)):
            if k == axis:
                g.union(a, b[offset : offset + len(a)])
            else:
                _union_same(g, a, b)
        offset += len(dims[axis])


def _split_prim(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src = ins[0]
    if src is None:
        return
    axis = eqn.params["axis"] % len(src)
    offset = 0
    for out in outs:
        for k, (a, b) in enumerate(zip(src, out, strict=True)):
            if k == axis:
                g.union(a[offset : offset + len(b)], b)
            else:
                g.union(a, b)
        offset += len(out[axis])


def _slice(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    p = eqn.params
    strides = p["strides"] or (1,) * len(src)
    for a, b, start, limit, step in zip(
        src, out, p["start_indices"], p["limit_indices"], strides, strict=True
    ):
        g.union(a[start:limit:step], b)


def _pad(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    src, (out,) = ins[0], outs
    if src is None:
        return
    for a, b, (lo, hi, interior) in zip(src, out, eqn.params["padding_config"], strict=True):
        if lo < 0 or hi < 0:
            g.block(a, b)
        else:
            g.union(a, b[lo : lo + len(a) * (interior + 1) : interior + 1][: len(a)])


def _sort(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    axis = eqn.params["dimension"]
    for src in ins:
        if src is None:
            continue
        for out in outs:
            for k, (a, b) in enumerate(zip(src, out, strict=True)):
                if k == axis:
                    g.block(a, b)
                else:
                    g.union(a, b)


def _free_outputs(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    """Fresh values whose shape follows the program (random bits): inputs excluded."""
    _block_all(g, ins, [])


def _block(g: _Graph, eqn: Any, ins: list[Dims | None], outs: list[Dims]) -> None:
    _block_all(g, ins, outs)


_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh bitcast_convert_type cbrt ceil clamp
    conj convert_element_type copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor
    ge gt imag integer_pow is_finite le lgamma digamma log log1p logistic lt max min mul ne neg
    nextafter not or pow real reduce_precision rem round rsqrt select_n shift_left
    shift_right_arithmetic shift_right_logical sign sin sinh sqrt square sub tan tanh xor
    population_count clz square stop_gradient""".split()
)

_RULES: dict[str, Callable[[_Graph, Any, list[Dims | None], list[Dims]], None]] = {
    **dict.fromkeys(_ELEMENTWISE, _elementwise),
    **dict.fromkeys(
        ("device_put", "optimization_barrier", "sharding_constraint", "mesh_cast", "reshard"),
        _one_to_one,
    ),
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "rev": _rev,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    **dict.fromkeys(
        (
            "reduce_sum",
            "reduce_max",
            "reduce_min",
            "reduce_prod",
            "reduce_and",
            "reduce_or",
            "reduce_xor",
            "argmax",
            "argmin",
        ),
        _reduce,
    ),
    **dict.fromkeys(("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"), _cumulative),
    **dict.fromkeys(
        ("reduce_window", "reduce_window_max", "reduce_window_min", "reduce_window_sum"), _window
    ),
    "concatenate": _concatenate,
    "split": _split_prim,
    "slice": _slice,
    "pad": _pad,
    "sort": _sort,
    "random_bits": _free_outputs,
    **dict.fromkeys(
        (
            "iota",
            "random_seed",
            "random_wrap",
            "random_unwrap",
            "random_fold_in",
            "random_split",
            "threefry2x32",
        ),
        _block,
    ),
}

_CALL_JAXPR_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _sub_jaxpr(eqn: Any) -> Any:
    """The jaxpr a call-like primitive runs on all its operands, or None."""
    for name in _CALL_JAXPR_PARAMS:
        sub = eqn.params.get(name)
        if sub is None:
            continue
        inner = getattr(sub, "jaxpr", sub)
        if len(inner.invars) == len(eqn.invars) and len(inner.outvars) == len(eqn.outvars):
            return sub
    return None


def _dims_of(g: _Graph, aval: Any) -> Dims:
    return [g.new(n) for n in getattr(aval, "shape", ())]


def _run_jaxpr(
    g: _Graph, closed: Any, args: list[Dims | None], unsupported: str, seen: set[str]
) -> list[Dims | None]:
    """Propagate through a (closed) jaxpr; returns the element ids of its outputs."""
    jaxpr = getattr(closed, "jaxpr", closed)
    env: dict[Any, Dims | None] = {}
    for var in jaxpr.constvars:  # constants of the program: their sizes are fixed
        dims = _dims_of(g, var.aval)
        g.block(*dims)
        env[var] = dims
    for var, dims in zip(jaxpr.invars, args, strict=True):
        env[var] = dims if dims is not None else _dims_of(g, var.aval)

    def read(atom: Any) -> Dims | None:
        if hasattr(atom, "val"):  # a Literal
            shape = np.shape(atom.val)
            if not shape:
                return None
            dims = [g.new(n) for n in shape]
            g.block(*dims)
            return dims
        return env[atom]

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = [_dims_of(g, v.aval) for v in eqn.outvars]
        name = eqn.primitive.name
        sub = _sub_jaxpr(eqn)
        if name == "cond":
            g.block(*(ins[0] or []))
            for branch in eqn.params["branches"]:
                for got, out in zip(
                    _run_jaxpr(g, branch, ins[1:], unsupported, seen), outs, strict=True
                ):
                    _one_to_one(g, eqn, [got], [out])
        elif sub is not None and name not in _RULES:
            for got, out in zip(_run_jaxpr(g, sub, ins, unsupported, seen), outs, strict=True):
                _one_to_one(g, eqn, [got], [out])
        elif name in _RULES:
            _RULES[name](g, eqn, ins, outs)
        elif unsupported == "error":
            shapes = ", ".join(str(v.aval) for v in eqn.invars)
            raise NotImplementedError(
                f"structured pruning does not know the primitive {name!r} (operands: "
                f"{shapes}); pass unsupported='exclude' to leave every axis it touches out "
                "of all groups"
            )
        else:
            if name not in seen:
                seen.add(name)
                warnings.warn(
                    f"primitive {name!r} is not understood by structured pruning; every "
                    "axis it touches is left out of all groups",
                    stacklevel=4,
                )
            _block_all(g, ins, outs)
        for var, dims in zip(eqn.outvars, outs, strict=True):
            env[var] = dims
    return [read(v) for v in jaxpr.outvars]


# ---------------------------------------------------------------------------
# Groups from the element graph.


def _is_key(leaf: Any) -> bool:
    return jnp.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key)


def _trace(model: nnx.Module, x: Any, unsupported: str) -> tuple[_Graph, list[tuple[str, Dims]]]:
    """The element graph of ``model(x)``, and the element ids of every variable axis."""
    graphdef, state = nnx.split(model)

    def forward(state: nnx.State, x: Any) -> tuple[Any, nnx.State]:
        module = nnx.merge(graphdef, state)
        return module(x), nnx.state(module)

    closed, (_, state_out) = jax.make_jaxpr(forward, return_shape=True)(state, x)
    g = _Graph()
    named = tree_lib.leaves_with_names(state)
    variables: list[tuple[str, Dims]] = []
    args: list[Dims | None] = []
    for name, leaf in named:
        dims = [g.new(n) for n in np.shape(leaf)]
        if _is_key(leaf):
            g.block(*dims)
        else:
            variables.append((name, dims))
        args.append(dims)
    n_state = len(args)
    for var in closed.jaxpr.invars[n_state:]:  # the model's input
        dims = _dims_of(g, var.aval)
        g.block(*dims)
        args.append(dims)
    results = _run_jaxpr(g, closed, args, unsupported, set())
    n_out = len(results) - len(jax.tree.leaves(state_out))
    for dims in results[:n_out]:  # the model's output
        if dims is not None:
            g.block(*dims)
    by_name = dict(zip([n for n, _ in named], args[:n_state], strict=True))
    for (name, _), dims in zip(tree_lib.leaves_with_names(state_out), results[n_out:], strict=True):
        before = by_name.get(name)
        if dims is None:
            continue
        if before is None or [len(d) for d in before] != [len(d) for d in dims]:
            g.block(*dims)
        else:  # the updated variable (running statistics) is the same variable
            for a, b in zip(before, dims, strict=True):
                g.union(a, b)
    return g, variables


def _close_products(g: _Graph) -> dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Join the components of products that were joined; returns products by root."""
    while True:
        by_root: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = defaultdict(list)
        for element, product in g.products.items():
            by_root[g.find(element)].append(product)
        changed = False
        for products in by_root.values():
            (first, sizes), rest = products[0], products[1:]
            for components, other_sizes in rest:
                if other_sizes != sizes:
                    g.block(np.array(first), np.array(components))
                    continue
                for a, b in zip(first, components, strict=True):
                    if g.find(a) != g.find(b):
                        g.union(np.array([a]), np.array([b]))
                        changed = True
        if not changed:
            return by_root


def _groups_from_graph(g: _Graph, variables: list[tuple[str, Dims]]) -> list[ChannelGroup]:
    products = _close_products(g)
    # Components of each product class, as roots.
    parts = {
        root: {g.find(c) for components, _ in prods for c in components}
        for root, prods in products.items()
    }
    blocked = {g.find(e) for e in g.blocked}
    changed = True
    while changed:  # a product that cannot go blocks its components
        changed = False
        for root, comps in parts.items():
            if root in blocked and not comps <= blocked:
                blocked |= comps
                changed = True
    # Variable entries per root: (variable order, axis) -> positions.
    entries: dict[int, dict[tuple[int, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    for v, (_, dims) in enumerate(variables):
        for axis, elements in enumerate(dims):
            for position, e in enumerate(elements.tolist()):
                entries[g.find(e)][(v, axis)].append(position)

    owners: dict[int, list[int]] = defaultdict(list)  # component root -> product roots
    for product_root, comps in parts.items():
        for comp in comps:
            owners[comp].append(product_root)

    def collect(root: int, into: dict[tuple[int, int], list[int]], depth: int) -> None:
        for key, positions in entries.get(root, {}).items():
            into[key].extend(positions)
        for product_root in owners.get(root, ()):
            if depth < 8:  # products of products (a flatten after a channel multiplier)
                collect(product_root, into, depth + 1)

    signatures: dict[tuple, list[dict[tuple[int, int], list[int]]]] = defaultdict(list)
    roots = sorted(r for r in entries.keys() | parts.keys() if r not in parts and r not in blocked)
    for root in roots:
        found: dict[tuple[int, int], list[int]] = defaultdict(list)
        collect(root, found, 0)
        if not found:
            continue
        signature = tuple(sorted((key, len(pos)) for key, pos in found.items()))
        signatures[signature].append(found)
    groups = []
    for signature, channels in signatures.items():
        first = signature[0][0]
        channels.sort(key=lambda c: min(c[first]))
        members = tuple(
            Member(
                variables[v][0],
                axis,
                np.array([sorted(c[(v, axis)]) for c in channels], dtype=np.int64),
            )
            for (v, axis), _ in signature
        )
        groups.append(ChannelGroup(len(channels), members))
    order = {name: i for i, (name, _) in enumerate(variables)}
    groups.sort(key=lambda grp: [(order[m.path], m.axis) for m in grp.members])
    return groups


def _check_model(model: Any) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module; got {type(model).__name__}")


def dependency_groups(
    model: nnx.Module, x: Any, *, unsupported: str = "error"
) -> list[ChannelGroup]:
    """Channel groups of ``model``, traced from ``model(x)``.

    Every removable channel is found from the jaxpr of ``model(x)`` (see the
    module docstring); channels that touch the same variable axes the same
    number of times form one group. Nothing that touches the input, the
    output (logits), a convolution window, a reduction over its axis, a
    grouped convolution other than depthwise, or an unknown primitive
    (``unsupported='exclude'``) is in any group. Batch-norm running
    statistics are members: the trace returns the updated state, so they are
    found in training mode too.

    Args:
      model: an NNX module called as ``model(x)``.
      x: an example input (arrays or ``jax.ShapeDtypeStruct``; only shapes
        and dtypes are used).
      unsupported: ``'error'`` raises on a primitive the analysis does not
        know; ``'exclude'`` warns once per primitive and leaves every axis it
        touches out of all groups.

    Returns:
      The groups, ordered by their first member's place in ``nnx.state``.

    Raises:
      TypeError: if ``model`` is not an ``nnx.Module``.
      ValueError: if ``unsupported`` is not ``'error'`` or ``'exclude'``.
      NotImplementedError: for an unknown primitive with ``unsupported='error'``.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> model = LeNet300100(64, rngs=nnx.Rngs(0))
      >>> for group in dependency_groups(model, jnp.zeros((1, 64))):
      ...     print(group)
      ChannelGroup(size=300, members=(fc1/bias[0], fc1/kernel[1], fc2/kernel[0]))
      ChannelGroup(size=100, members=(fc2/bias[0], fc2/kernel[1], fc3/kernel[0]))

    References:
      Fang, Ma, Song, Mi, Wang, "DepGraph: Towards Any Structural Pruning",
      https://arxiv.org/abs/2301.12900, CVPR 2023.
    """
    _check_model(model)
    if unsupported not in ("error", "exclude"):
        raise ValueError(
            f"unsupported must be 'error' or 'exclude'; got unsupported={unsupported!r}"
        )
    g, variables = _trace(model, x, unsupported)
    return _groups_from_graph(g, variables)


# ---------------------------------------------------------------------------
# Importance, keep sets, shrinking.


def _member_slices(leaf: Any, member: Member) -> np.ndarray:
    """``(size, rest)`` float32: the entries of each channel of ``member`` in ``leaf``."""
    moved = np.moveaxis(np.asarray(leaf, np.float32), member.axis, 0)
    return moved[member.index].reshape(member.index.shape[0], -1)  # (size, k * rest)


def _norm_scales(model: nnx.Module) -> set[str]:
    """Names of the scale vectors of the normalisation layers in ``model``."""
    names = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm)):
            names.add("/".join(str(p) for p in (*path, "scale")))
    return names


def _check_groups(groups: Any) -> list[ChannelGroup]:
    groups = list(groups)
    for i, group in enumerate(groups):
        if not isinstance(group, ChannelGroup):
            raise TypeError(
                f"groups[{i}] must be a ChannelGroup (from dependency_groups); "
                f"got {type(group).__name__}"
            )
    return groups


def _taylor_grads(
    model: nnx.Module, batch: tuple[Any, Any], loss_fn: Callable[..., jax.Array] | None
) -> dict[str, jax.Array]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = batch

    def loss(params: nnx.State) -> jax.Array:
        module = nnx.merge(graphdef, params, rest, copy=True)
        logits = module(x)
        if loss_fn is not None:
            return loss_fn(logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return dict(tree_lib.leaves_with_names(jax.grad(loss)(params)))


def group_importance(
    model: nnx.Module,
    groups: Sequence[ChannelGroup],
    criterion: str = "l2",
    *,
    batch: tuple[Any, Any] | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> list[np.ndarray]:
    r"""Importance of every channel of every group (larger: more important).

    With :math:`W^{(m)}_c` the entries of channel :math:`c` in member
    :math:`m` (parameters only; running statistics are not weights):

    .. math::

      \text{l1}: \sum_m \lVert W^{(m)}_c \rVert_1, \quad
      \text{l2}: \Bigl(\sum_m \lVert W^{(m)}_c \rVert_2^2\Bigr)^{1/2}, \quad
      \text{bn}: \sum_{m \in \text{norm scales}} \lvert \gamma^{(m)}_c \rvert, \quad
      \text{taylor}: \sum_m \sum \lvert W^{(m)}_c \odot \partial L / \partial W^{(m)}_c \rvert .

    Args:
      model: the NNX module the groups were traced from.
      groups: from :func:`dependency_groups`.
      criterion: ``'l1'``, ``'l2'``, ``'bn'`` (network slimming: the
        normalisation scales of the group) or ``'taylor'`` (first-order
        Taylor estimate of the loss change; needs ``batch``).
      batch: ``(x, y)`` for ``'taylor'``: inputs and integer labels.
      loss_fn: ``(logits, y) -> scalar`` for ``'taylor'``; default mean
        softmax cross-entropy.

    Returns:
      One float32 array ``(group.size,)`` per group.

    Raises:
      ValueError: for an unknown criterion, ``'taylor'`` without ``batch``,
        or ``'bn'`` for a group without a normalisation scale.
      TypeError: if ``groups`` holds something other than ``ChannelGroup``.

    Example:
      >>> model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> mlp = nnx.Sequential(model, nnx.relu, nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> groups = dependency_groups(mlp, jnp.zeros((1, 3)))
      >>> [s.shape for s in group_importance(mlp, groups, 'l1')]
      [(4,)]

    References:
      Li et al., "Pruning Filters for Efficient ConvNets" (l1),
      https://arxiv.org/abs/1608.08710, 2017; Liu et al., "Learning
      Efficient Convolutional Networks through Network Slimming" (bn),
      https://arxiv.org/abs/1708.06519, 2017; Molchanov et al., "Importance
      Estimation for Neural Network Pruning" (taylor),
      https://arxiv.org/abs/1906.10771, 2019.
    """
    _check_model(model)
    groups = _check_groups(groups)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got criterion={criterion!r}")
    if criterion == "taylor" and batch is None:
        raise ValueError("criterion='taylor' needs batch=(x, y); got batch=None")
    params = dict(tree_lib.leaves_with_names(nnx.state(model, nnx.Param)))
    grads = _taylor_grads(model, batch, loss_fn) if criterion == "taylor" and batch else {}
    scales = _norm_scales(model) if criterion == "bn" else set()
    scores = []
    for i, group in enumerate(groups):
        total = np.zeros(group.size, np.float32)
        used = 0
        for member in group.members:
            if member.path not in params or (criterion == "bn" and member.path not in scales):
                continue
            w = _member_slices(params[member.path], member)
            if criterion == "l1" or criterion == "bn":
                total += np.abs(w).sum(axis=1)
            elif criterion == "l2":
                total += np.square(w).sum(axis=1)
            else:
                total += np.abs(w * _member_slices(grads[member.path], member)).sum(axis=1)
            used += 1
        if criterion == "bn" and not used:
            raise ValueError(
                f"criterion='bn' needs a normalisation scale in every group; groups[{i}] "
                f"({group!r}) has none"
            )
        scores.append(np.sqrt(total) if criterion == "l2" else total)
    return scores


def _kept_count(size: int, fraction: float, round_to: int) -> int:
    keep = size - int(round(fraction * size))
    keep = -(-max(keep, 1) // round_to) * round_to
    return min(keep, size)


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {name}={value!r}")


def _group_fractions(
    groups: list[ChannelGroup], fraction: float | Mapping[str, float]
) -> list[float]:
    if not isinstance(fraction, Mapping):
        _check_fraction("fraction", fraction)
        return [float(fraction)] * len(groups)
    out = [0.0] * len(groups)
    for name, value in fraction.items():
        _check_fraction(f"fraction[{name!r}]", value)
        hits = [i for i, g in enumerate(groups) if any(m.path == name for m in g.members)]
        if not hits:
            raise ValueError(
                f"fraction names {name!r}, which is no member of any group; members are "
                "variable names such as 'fc1/kernel'"
            )
        for i in hits:
            out[i] = max(out[i], float(value))
    return out


def keep_top(
    scores: Sequence[np.ndarray],
    fraction: float | Sequence[float],
    *,
    round_to: int = 1,
) -> list[np.ndarray]:
    """Indices of the channels to keep: the highest scores of each group, sorted.

    Group ``i`` of size ``n`` keeps ``n - round(fraction_i * n)`` channels,
    rounded up to a multiple of ``round_to`` (at most ``n``, at least one).
    Ties keep the smaller channel index.

    Args:
      scores: one array ``(size,)`` per group (:func:`group_importance`).
      fraction: removed fraction in ``[0, 1)``, for all groups or per group.
      round_to: kept counts are multiples of this (e.g. 8 for hardware).

    Returns:
      One sorted int64 array of kept channel indices per group.

    Raises:
      ValueError: for a fraction outside ``[0, 1)``, a per-group list of the
        wrong length, or ``round_to < 1``.

    Example:
      >>> keep_top([np.array([0.5, 2.0, 1.0, 0.1])], 0.5)
      [array([1, 2])]
    """
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be an int >= 1; got round_to={round_to!r}")
    fractions = [fraction] * len(scores) if isinstance(fraction, (int, float)) else list(fraction)
    if len(fractions) != len(scores):
        raise ValueError(
            f"fraction must be one number or one per group ({len(scores)}); "
            f"got {len(fractions)} values"
        )
    keep = []
    for i, (score, f) in enumerate(zip(scores, fractions, strict=True)):
        _check_fraction(f"fraction[{i}]", f)
        keep.append(_top(np.asarray(score), _kept_count(len(score), float(f), round_to)))
    return keep


def _top(score: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the ``n`` highest scores; ties keep the smaller index."""
    return np.sort(np.argsort(-score, kind="stable")[:n]).astype(np.int64)


def _removed_positions(
    groups: list[ChannelGroup], keep: Sequence[Any]
) -> dict[tuple[str, int], set[int]]:
    if len(keep) != len(groups):
        raise ValueError(
            f"keep must hold one index array per group ({len(groups)}); got {len(keep)}"
        )
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for i, (group, kept) in enumerate(zip(groups, keep, strict=True)):
        kept = np.asarray(kept)
        if (
            kept.ndim != 1
            or not np.issubdtype(kept.dtype, np.integer)
            or len(kept) == 0
            or len(np.unique(kept)) != len(kept)
            or kept.min() < 0
            or kept.max() >= group.size
        ):
            raise ValueError(
                f"keep[{i}] must be distinct integer channel indices in [0, {group.size}), "
                f"at least one; got {kept!r}"
            )
        drop = np.setdiff1d(np.arange(group.size), kept)
        for member in group.members:
            removed[(member.path, member.axis)].update(member.index[drop].ravel().tolist())
    return removed


def _fix_linear(module: nnx.Linear) -> None:
    module.in_features, module.out_features = module.kernel.shape


def _fix_conv(module: nnx.Conv) -> None:
    shape = module.kernel.shape
    groups = module.feature_group_count
    if groups > 1 and shape[-2] == 1 and module.in_features == groups:  # depthwise
        multiplier = module.out_features // groups
        groups = shape[-1] // multiplier
        module.feature_group_count = groups
    module.kernel_shape = tuple(shape)
    module.in_features = shape[-2] * groups
    module.out_features = shape[-1]


def _fix_norm(module: Any) -> None:
    for name in ("scale", "bias", "mean"):
        variable = getattr(module, name, None)
        if isinstance(variable, nnx.Variable):
            module.num_features = variable.shape[-1]
            return


def _fix_embed(module: nnx.Embed) -> None:
    module.num_embeddings, module.features = module.embedding.shape


# Size attributes of Flax layers, set from their variables after a resize.
_SIZE_ATTRIBUTES: dict[type, Callable[[Any], None]] = {
    nnx.Linear: _fix_linear,
    nnx.Conv: _fix_conv,
    nnx.BatchNorm: _fix_norm,
    nnx.LayerNorm: _fix_norm,
    nnx.RMSNorm: _fix_norm,
    nnx.GroupNorm: _fix_norm,
    nnx.Embed: _fix_embed,
}


def _copy(leaf: Any) -> Any:
    """A copy of a concrete array (through the host: no kernel to compile per shape)."""
    if isinstance(leaf, jax.Array) and not _is_key(leaf):
        return jnp.asarray(np.array(leaf))
    return leaf


def _check_not_linen(model: nnx.Module, names: list[str], new: list[Any], old: list[Any]) -> None:
    """TypeError if a variable of a Linen module (``nnx.bridge.ToNNX``) changes shape."""
    linen = [
        "/".join(map(str, path))
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.bridge.ToNNX)
    ]
    if not linen:
        return
    for name, a, b in zip(names, new, old, strict=True):
        if np.shape(a) != np.shape(b) and any(name.startswith(p) for p in linen):
            where = f"at {linen[0]!r}" if linen[0] else "as the model"
            raise TypeError(
                f"{name} belongs to a Linen module (nnx.bridge.ToNNX {where}), whose "
                "layer sizes are fixed in its code: it cannot be resized. dependency_groups, "
                "group_importance and channel_masks work on it (pruning without shrinking); "
                "for a smaller model, write it in NNX (flax.nnx) or build the Linen module "
                "with the kept widths and load the sliced arrays"
            )


def resized(model: nnx.Module, arrays: Mapping[str, Any]) -> nnx.Module:
    """A copy of ``model`` whose variables are ``arrays``, of any shapes.

    Variables named in ``arrays`` (names as :func:`jaxopt_nn.tree.path_name`
    gives them, e.g. ``'fc1/kernel'``) take the new value; the others are
    copied. The size attributes of Flax layers are then set from their
    variables (``nnx.Linear``: ``in_features``, ``out_features``;
    ``nnx.Conv``: also ``kernel_shape`` and, depthwise, ``feature_group_count``;
    normalisations: ``num_features``; ``nnx.Embed``). ``model`` is not
    changed; it may be abstract (``nnx.eval_shape``), which is how a shrunk
    model is rebuilt from the shapes stored in an archive.

    Args:
      model: an NNX module.
      arrays: ``{name: array}``; every name must be a variable of ``model``.

    Returns:
      The new module.

    Raises:
      ValueError: if a name is not a variable of ``model``.
      TypeError: if a new shape belongs to a Linen module wrapped by
        ``nnx.bridge.ToNNX``: Linen layers take their sizes from the code
        (``nn.Dense(16)`` in a compact ``__call__``), which cannot be changed
        from outside. Analysis, importance and :func:`channel_masks` work on
        such a model; for a smaller one, write the model in NNX or build the
        Linen module with the kept widths and load the sliced arrays.

    Example:
      >>> small = resized(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), {'kernel': jnp.ones((4, 2)),
      ...                                                     'bias': jnp.zeros(2)})
      >>> small.out_features, small(jnp.ones((1, 4))).shape
      (2, (1, 2))
    """
    _check_model(model)
    graphdef, state = nnx.split(model)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [tree_lib.path_name(p) for p, _ in flat]
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise ValueError(f"arrays names variables the model does not have: {unknown[:4]}")
    leaves = [
        jnp.asarray(arrays[n]) if n in arrays else _copy(v)
        for n, (_, v) in zip(names, flat, strict=True)
    ]
    _check_not_linen(model, names, leaves, [v for _, v in flat])
    module = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
    for _, node in nnx.iter_graph(module):
        fix = _SIZE_ATTRIBUTES.get(type(node))
        if fix is not None:
            fix(node)
    return module


def shrink(model: nnx.Module, groups: Sequence[ChannelGroup], keep: Sequence[Any]) -> nnx.Module:
    """A new, smaller model that keeps only the channels ``keep`` of each group.

    Every member axis of every group is sliced to its kept positions (in
    their original order), all groups at once, and the model is rebuilt by
    :func:`resized`. ``model`` is untouched. The new model has fewer
    parameters and FLOPs; it jits, trains and checkpoints like any model.

    Removing channels whose consumers' weights are zero leaves the outputs
    unchanged (up to the reassociation of floating-point sums).

    Args:
      model: the NNX module the groups were traced from.
      groups: from :func:`dependency_groups`.
      keep: per group, the channel indices to keep (distinct, in
        ``[0, group.size)``, at least one); e.g. from :func:`keep_top`.

    Returns:
      The shrunk module.

    Raises:
      ValueError: if ``keep`` does not match ``groups``.
      TypeError: if ``model`` is not an ``nnx.Module`` or ``groups`` holds
        something else.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> model = LeNet300100(64, rngs=nnx.Rngs(0))
      >>> groups = dependency_groups(model, jnp.zeros((1, 64)))
      >>> small = shrink(model, groups, [np.arange(30), np.arange(10)])
      >>> small.fc2.kernel.shape, small.fc2.in_features, model.fc2.kernel.shape
      ((30, 10), 30, (300, 100))
    """
    _check_model(model)
    groups = _check_groups(groups)
    removed = _removed_positions(groups, keep)
    current = dict(tree_lib.leaves_with_names(nnx.state(model)))
    arrays: dict[str, Any] = {}
    for (path, axis), positions in removed.items():
        value = arrays.get(path, current[path])
        kept = np.setdiff1d(np.arange(np.shape(current[path])[axis]), sorted(positions))
        arrays[path] = np.take(np.asarray(value), kept, axis=axis)
    return resized(model, arrays)


def channel_masks(
    model: nnx.Module, groups: Sequence[ChannelGroup], keep: Sequence[Any]
) -> nnx.State:
    """Masks (1 kept, 0 removed) on the parameters: the same choice as :func:`shrink`.

    ``params * mask`` zeroes every parameter entry of every removed channel
    (producers, biases, norm scales and shifts, consumers), so the masked
    dense model computes what the shrunk model computes. Use it for gradual
    structured pruning during training: ``train.fit(..., param_transform=
    lambda p: jax.tree.map(jnp.multiply, p, mask))`` trains the remaining
    channels; :func:`shrink` with the same ``keep`` then removes the zeros.

    Args:
      model: the NNX module the groups were traced from.
      groups: from :func:`dependency_groups`.
      keep: per group, the channel indices to keep.

    Returns:
      An ``nnx.State`` like ``nnx.state(model, nnx.Param)`` with masks of the
      parameters' dtypes.

    Raises:
      ValueError: if ``keep`` does not match ``groups``.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> model = LeNet300100(64, rngs=nnx.Rngs(0))
      >>> groups = dependency_groups(model, jnp.zeros((1, 64)))
      >>> masks = channel_masks(model, groups, [np.arange(150), np.arange(100)])
      >>> int(masks['fc1']['bias'].sum()), int(masks['fc2']['kernel'].sum())
      (150, 15000)
    """
    _check_model(model)
    groups = _check_groups(groups)
    removed = _removed_positions(groups, keep)
    params = nnx.state(model, nnx.Param)

    def mask(path: Any, leaf: jax.Array) -> jax.Array:
        name = tree_lib.path_name(path)
        m = np.ones(np.shape(leaf), np.bool_)
        for axis in range(np.ndim(leaf)):
            positions = sorted(removed.get((name, axis), ()))
            if positions:
                index = [slice(None)] * np.ndim(leaf)
                index[axis] = positions  # type: ignore[call-overload]
                m[tuple(index)] = False
        return jnp.asarray(m.astype(leaf.dtype))

    return jax.tree_util.tree_map_with_path(mask, params)


def prune_channels(
    model: nnx.Module,
    x: Any,
    fraction: float | Mapping[str, float],
    *,
    criterion: str = "l2",
    round_to: int = 1,
    batch: tuple[Any, Any] | None = None,
    unsupported: str = "error",
) -> nnx.Module:
    """Remove the least important ``fraction`` of the channels of every group, in one call.

    :func:`dependency_groups`, :func:`group_importance`, :func:`keep_top`
    and :func:`shrink` in a row.

    Args:
      model: an NNX module called as ``model(x)``.
      x: an example input (shapes only).
      fraction: removed fraction in ``[0, 1)`` for every group, or a mapping
        ``{variable name: fraction}`` for the groups that have that variable
        as a member (e.g. ``{'fc1/kernel': 0.8}``); others keep everything.
      criterion: see :func:`group_importance`.
      round_to: kept channel counts are multiples of this (at most the size).
      batch: ``(x, y)`` for ``criterion='taylor'``.
      unsupported: see :func:`dependency_groups`.

    Returns:
      The shrunk module; ``model`` is untouched.

    Raises:
      ValueError: for a fraction outside ``[0, 1)``, an unknown name in a
        mapping, or the errors of the functions above.

    Example:
      >>> from jaxopt_nn.models import LeNet300100
      >>> model = LeNet300100(64, rngs=nnx.Rngs(0))
      >>> small = prune_channels(model, jnp.zeros((1, 64)), 0.5, round_to=8)
      >>> small.fc1.out_features, small.fc2.out_features
      (152, 56)
    """
    groups = dependency_groups(model, x, unsupported=unsupported)
    fractions = _group_fractions(groups, fraction)
    scores = group_importance(model, groups, criterion, batch=batch)
    return shrink(model, groups, keep_top(scores, fractions, round_to=round_to))


class SlimStage(NamedTuple):
    """One step of :func:`gradual_prune`."""

    fraction: float  # removed fraction of each group's original channels
    model: nnx.Module  # the shrunk, fine-tuned model (evaluation mode)
    history: list[dict[str, float]]  # the fine-tuning records of train.fit


def _group_key(group: ChannelGroup) -> tuple[str, int]:
    return group.members[0].path, group.members[0].axis


def distillation_loss_fn(teacher: nnx.Module, *, weight: float, temperature: float = 4.0):
    r"""A ``loss_fn`` that mixes the labels with the softened outputs of a teacher.

    .. math::

      L = (1 - w)\, \mathrm{CE}(z, y)
          + w\, T^2\, \mathrm{CE}\left(\mathrm{softmax}(z_t / T), z / T\right)

    with the student's logits :math:`z`, the teacher's :math:`z_t` (evaluation
    mode, no gradient) and the temperature :math:`T`; the :math:`T^2` keeps
    the gradient scale of the soft term independent of :math:`T`. The
    teacher's weights are constants of the compiled step.

    Args:
      teacher: the NNX module to imitate (not modified; a copy is set to
        evaluation mode).
      weight: :math:`w \in [0, 1]`, the share of the soft term.
      temperature: :math:`T > 0`.

    Returns:
      ``loss_fn(model, x, y) -> (loss, logits)`` for :func:`jaxopt_nn.train.fit`.

    Raises:
      ValueError: if ``weight`` or ``temperature`` is out of range.

    References:
      Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
      https://arxiv.org/abs/1503.02531, 2015.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise ValueError(f"weight must be a number in [0, 1]; got weight={weight!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a number > 0; got temperature={temperature!r}")
    copy = nnx.clone(teacher)
    copy.eval()
    graphdef, state = nnx.split(copy)

    def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model(x)
        soft = jax.nn.softmax(jax.lax.stop_gradient(nnx.merge(graphdef, state)(x)) / temperature)
        kd = optax.softmax_cross_entropy(logits / temperature, soft).mean() * temperature**2
        return (1 - weight) * train_lib.cross_entropy_loss(logits, y) + weight * kd, logits

    return loss_fn


def gradual_prune(
    model: nnx.Module,
    data: Dataset,
    fraction: float,
    *,
    steps: int = 3,
    epochs: int = 2,
    tx: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    distill: float = 0.0,
    criterion: str = "l2",
    round_to: int = 1,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[SlimStage], None] | None = None,
) -> list[SlimStage]:
    r"""Iterative structured pruning: shrink a little, fine-tune, repeat.

    Step :math:`i = 1 \ldots n` removes channels until every group has lost
    the fraction

    .. math::

      f_i = f \left(1 - \left(1 - i / n\right)^3\right)

    of its original channels (the cubic schedule of Zhu & Gupta: large steps
    first, small ones at the end), ranking the current channels by
    :func:`group_importance`, then fine-tunes the shrunk model for
    ``epochs`` epochs with :func:`jaxopt_nn.train.fit` (by default Adam
    whose learning rate decays from ``learning_rate`` to 0 along a cosine
    over each step's fine-tuning; with ``distill > 0`` the loss also follows
    the given model's outputs, :func:`distillation_loss_fn`). Every step
    works on a physically smaller model, so fine-tuning gets faster as it
    goes.

    Args:
      model: the trained NNX module.
      data: the data set; ``data.x_train[:2]`` is the example input.
      fraction: final removed fraction of every group, in ``[0, 1)``.
      steps: number of prune/fine-tune steps (>= 1).
      epochs: fine-tuning epochs per step (>= 1).
      tx: the optimizer of the fine-tuning (fresh state every step); default
        ``optax.adam`` with the cosine decay from ``learning_rate``.
      learning_rate: peak learning rate of the default ``tx``.
      distill: weight in ``[0, 1]`` of the distillation from ``model`` (the
        original, unpruned one) in the fine-tuning loss; 0: labels only.
      criterion: see :func:`group_importance` (``'taylor'`` uses the first
        256 training examples).
      round_to: kept channel counts are multiples of this.
      batch_size, seed, progress: passed to :func:`jaxopt_nn.train.fit`.
      callback: called with every :class:`SlimStage` as it finishes.

    Returns:
      One :class:`SlimStage` per step; the last holds the final model.

    Raises:
      ValueError: for a fraction outside ``[0, 1)`` or a count below 1.

    Example:
      >>> from jaxopt_nn.data import load_digits
      >>> from jaxopt_nn.models import LeNet300100
      >>> data = load_digits()
      >>> data = data._replace(x_train=data.x_train[:256], y_train=data.y_train[:256])
      >>> model = LeNet300100(64, hidden=(40, 20), rngs=nnx.Rngs(0))
      >>> (stage,) = gradual_prune(model, data, 0.5, steps=1, epochs=1)
      >>> stage.fraction, stage.model.fc1.out_features, stage.model.fc2.out_features
      (0.5, 20, 10)

    References:
      Zhu & Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878,
      2017 (the schedule); Fang et al., DepGraph, https://arxiv.org/abs/2301.12900,
      2023.
    """
    _check_model(model)
    _check_fraction("fraction", fraction)
    for name, value in (("steps", steps), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {name}={value!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got criterion={criterion!r}")
    if tx is None:
        updates = epochs * max(1, len(data.x_train) // batch_size)
        tx = optax.adam(optax.cosine_decay_schedule(learning_rate, updates))
    loss_fn = distillation_loss_fn(model, weight=distill) if distill else None
    x = jnp.asarray(data.x_train[:2])
    batch = (jnp.asarray(data.x_train[:256]), jnp.asarray(data.y_train[:256]))
    original = {_group_key(g): g.size for g in dependency_groups(model, x)}
    stages: list[SlimStage] = []
    for i in range(1, steps + 1):
        f_i = fraction * (1.0 - (1.0 - i / steps) ** 3)
        groups = dependency_groups(model, x)
        scores = group_importance(
            model, groups, criterion, batch=batch if criterion == "taylor" else None
        )
        keep = [
            _top(score, min(g.size, _kept_count(original[_group_key(g)], f_i, round_to)))
            for g, score in zip(groups, scores, strict=True)
        ]
        result = train_lib.fit(
            shrink(model, groups, keep),
            tx,
            data,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed + i,
            progress=progress,
            loss_fn=loss_fn,
        )
        model = train_lib.to_model(result.graphdef, result.state)
        stages.append(SlimStage(f_i, model, result.history))
        if callback is not None:
            callback(stages[-1])
    return stages
