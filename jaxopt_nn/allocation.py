"""Per-layer sparsity and codebook width under an accuracy budget.

The search behind ``deep_compress(..., max_drop=...)``:

1. :func:`split_validation` carves a stratified, seeded validation split out
   of the training data; every choice is measured on it, never on the test
   split.
2. :func:`layer_sensitivity` prunes one layer at a time by magnitude (one
   shot) to each candidate sparsity, shares its kept weights with k-means at
   each candidate width, and records the increase of the validation loss.
3. :func:`allocations` turns the sensitivities into a family of per-layer
   ``(sparsity, bits)`` choices, one per Lagrange multiplier :math:`\\lambda`:
   each layer independently minimises

   .. math::
     \\hat B_l(s, b) + \\lambda \\max(0, \\Delta L_l(s, b)),

   the estimated archive bytes (:func:`estimate_bytes`) plus the weighted
   loss increase. Small :math:`\\lambda` gives small, inaccurate models.

The pipeline then trains the candidates (gradual pruning with retraining,
weight sharing, fine-tuning), verifies each on the validation split and
bisects the family for the smallest archive within the budget.

References:
  Han, Pool, Tran, Dally, "Learning both Weights and Connections for
  Efficient Neural Networks", NeurIPS, https://arxiv.org/abs/1506.02626,
  2015 (per-layer sensitivity analysis, Figure 6).
  Shoham, Gersho, "Efficient bit allocation for an arbitrary set of
  quantizers", IEEE Trans. ASSP, 1988 (Lagrangian allocation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_nn import quantization, train
from jaxopt_nn import tree as tree_lib
from jaxopt_nn.data import Dataset

# Candidate grids of the sensitivity analysis.
SPARSITIES = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.985, 0.99, 0.995)
BITS = (3, 4, 5, 6, 8)
# Scaled defaults (see scaled_allocations): kept fractions times SCALES, widths capped.
SCALES = (1.0, 0.6, 0.4, 0.25)
CAPS = (5, 4, 3)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1); got {name}={value!r}")
    return float(value)


def split_validation(
    data: Dataset, fraction: float = 0.1, *, seed: int = 0, fold: int = 0
) -> Dataset:
    """The training split divided into training and validation, stratified by class.

    Each class gives ``round(fraction * count)`` of its examples (at least one
    when it has two or more), drawn with ``seed``. The test split is not
    used. ``fold`` picks the ``fold``-th such block of each class's seeded
    permutation, so folds ``0, 1, ...`` of one seed hold out disjoint
    validation splits (cross-validation); fold 0 is the first block.

    Args:
      data: a :class:`~jaxopt_nn.data.Dataset`.
      fraction: share of the training examples held out, in ``(0, 1)``.
      seed: seed of the draw.
      fold: which block of the draw is held out (``>= 0``).

    Returns:
      A ``Dataset`` whose ``x_train``/``y_train`` are the remaining training
      examples and whose ``x_test``/``y_test`` are the validation examples;
      ``classes`` is ``data.num_classes``.

    Raises:
      ValueError: if ``fraction`` or ``fold`` is out of range (a class of two
        or more examples must keep one for training) or leaves either part
        empty.

    Example:
      >>> from jaxopt_nn.data import load_digits
      >>> part = split_validation(load_digits(), 0.1)
      >>> len(part.x_train), len(part.x_test)
      (1211, 136)
    """
    fraction = _check_fraction("validation", fraction)
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 0:
        raise ValueError(f"fold must be an integer >= 0; got fold={fold!r}")
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(data.y_train):
        members = np.flatnonzero(data.y_train == label)
        count = round(fraction * members.size)
        if members.size >= 2:
            count = min(max(count, 1), members.size - 1)
            if (fold + 1) * count > members.size - 1:
                raise ValueError(
                    f"fold={fold} of validation={fraction} needs {(fold + 1) * count} of the "
                    f"{members.size} training examples of class {label} (one must stay for "
                    f"training); allowed: fold < {(members.size - 1) // count}"
                )
        held.append(rng.permutation(members)[fold * count : (fold + 1) * count])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(data.y_train)), val)
    if val.size == 0 or keep.size == 0:
        raise ValueError(
            f"validation={fraction} of {len(data.y_train)} training examples leaves "
            f"{keep.size} for training and {val.size} for validation; both must be > 0"
        )
    return Dataset(
        data.x_train[keep],
        data.y_train[keep],
        data.x_train[val],
        data.y_train[val],
        data.num_classes,
    )


def _binary_entropy(p: float) -> float:
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def estimate_bytes(size: int, sparsity: float, bits: int) -> float:
    """Estimated archive bytes of a ``size``-weight kernel pruned and shared.

    .. math::
      \\hat B = \\frac{k (b + H(p) / p)}{8} + 4 \\cdot 2^b,
      \\quad k = p \\cdot n,\\; p = 1 - s,

    with :math:`H` the binary entropy: a Huffman-coded relative index costs
    about :math:`H(p)/p` bits per kept weight, a codebook index at most
    :math:`b`, and each centroid 4 bytes.

    Example:
      >>> round(estimate_bytes(30000, 0.98, 4))
      894
    """
    kept = (1.0 - sparsity) * size
    p = max(1.0 - sparsity, 1e-9)
    return kept * (bits + _binary_entropy(p) / p) / 8 + 4 * min(2**bits, max(kept, 1))


class Sensitivity(NamedTuple):
    """Validation loss increase of one layer pruned and shared alone."""

    name: str  # leaf name
    size: int  # weights in the leaf
    delta: dict[tuple[float, int], float]  # (sparsity, bits) -> loss increase


def _magnitude_keep(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask of the ``1 - sparsity`` largest magnitudes (ties by position)."""
    flat = np.abs(w).ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[: flat.size - round(sparsity * flat.size)]] = True
    return keep.reshape(w.shape)


def layer_sensitivity(
    graphdef: nnx.GraphDef,
    state: train.TrainState,
    validation: Dataset,
    names: Sequence[str],
    *,
    sparsities: Sequence[float] = SPARSITIES,
    bits: Sequence[int] = BITS,
) -> list[Sensitivity]:
    """Loss increase on the validation split when one layer alone is pruned and shared.

    For every named leaf, sparsity :math:`s` and width :math:`b`: the leaf's
    ``1 - s`` largest weights are kept, shared with
    :func:`~jaxopt_nn.quantization.kmeans_codebook` at :math:`b` bits (linear
    initialisation), the others left as trained, and the model evaluated on
    ``validation.x_test`` (no retraining).

    Args:
      graphdef: the model's graphdef.
      state: the trained (dense) state.
      validation: a dataset whose test split is the validation split (see
        :func:`split_validation`).
      names: leaf names of ``state.params`` to analyse.
      sparsities: candidate sparsities, each in ``[0, 1)``.
      bits: candidate codebook widths.

    Returns:
      One :class:`Sensitivity` per name, in the order given.
    """
    eval_step = train.make_eval_step(graphdef)

    def loss(params: nnx.State) -> float:
        metrics = train._evaluate_with(
            eval_step, state._replace(params=params), validation.x_test, validation.y_test, 1024
        )
        return metrics["loss"]

    base = loss(state.params)
    leaves = dict(tree_lib.leaves_with_names(state.params))
    out = []
    for name in names:
        w = np.asarray(leaves[name], np.float32)
        delta = {}
        for s in sparsities:
            keep = _magnitude_keep(w, s)
            for b in bits:
                book = quantization.kmeans_codebook(
                    jnp.asarray(w * keep), b, mask=jnp.asarray(keep)
                )
                shared = quantization.codebook_weights(book, leaves[name].dtype)
                params = tree_lib.map_with_names(
                    lambda n, x, shared=shared, name=name: shared if n == name else x,
                    state.params,
                )
                delta[(s, b)] = loss(params) - base
        out.append(Sensitivity(name, w.size, delta))
    return out


class Allocation(NamedTuple):
    """One candidate of the search: per-layer sparsity and codebook width."""

    multiplier: float | None  # the Lagrange multiplier that chose it; None: a scaled default
    sparsity: dict[str, float]  # leaf name -> pruned fraction
    bits: dict[str, int]  # leaf name -> codebook width
    estimated_bytes: float  # sum of estimate_bytes over the layers


def allocations(
    sensitivities: Sequence[Sensitivity], multipliers: Sequence[float] | None = None
) -> list[Allocation]:
    """Distinct Lagrangian allocations, smallest estimated archive first.

    Args:
      sensitivities: from :func:`layer_sensitivity`.
      multipliers: the :math:`\\lambda` values tried (bytes per unit of
        loss); default 49 values spaced evenly in log from 1 to 1e8.

    Returns:
      The allocations, sorted by ``estimated_bytes``; of several multipliers
      choosing the same allocation the smallest is kept.

    Example:
      >>> sens = [Sensitivity('w', 1000, {(0.5, 2): 0.0, (0.9, 2): 1.0})]
      >>> [(a.sparsity['w'], a.bits['w']) for a in allocations(sens, [1.0, 1e6])]
      [(0.9, 2), (0.5, 2)]
    """
    lams = np.geomspace(1.0, 1e8, 49).tolist() if multipliers is None else list(multipliers)
    found: dict[tuple, Allocation] = {}
    for lam in sorted(lams):
        sparsity, bits, total = {}, {}, 0.0
        for sens in sensitivities:

            def cost(
                choice: tuple[float, int], sens: Sensitivity = sens, lam: float = lam
            ) -> float:
                return estimate_bytes(sens.size, *choice) + lam * max(0.0, sens.delta[choice])

            s, b = min(sens.delta, key=cost)
            sparsity[sens.name], bits[sens.name] = s, b
            total += estimate_bytes(sens.size, s, b)
        key = tuple(sorted(sparsity.items())) + tuple(sorted(bits.items()))
        found.setdefault(key, Allocation(float(lam), sparsity, bits, total))
    return sorted(found.values(), key=lambda a: a.estimated_bytes)


def scaled_allocations(
    sparsity: dict[str, float],
    bits: dict[str, int],
    sizes: dict[str, int],
    *,
    scales: Sequence[float] = SCALES,
    caps: Sequence[int] = CAPS,
) -> list[Allocation]:
    """A hand-set allocation made smaller: kept fractions times ``scales``, widths capped.

    Candidates beside the Lagrangian ones: one-shot sensitivities
    overestimate what retraining cannot recover, so the search also tries the
    default per-layer shape (e.g. the output layer pruned least) at higher
    sparsity and fewer bits, verified like any other candidate.

    Args:
      sparsity: leaf name -> the default sparsity.
      bits: leaf name -> the default width.
      sizes: leaf name -> number of weights.
      scales: factors of each layer's kept fraction ``1 - sparsity``.
      caps: upper bounds on every width.

    Returns:
      One :class:`Allocation` per (scale, cap), sorted by estimated bytes.

    Example:
      >>> [a.sparsity['w'] for a in scaled_allocations({'w': 0.9}, {'w': 5}, {'w': 100},
      ...                                              scales=(1.0, 0.5), caps=(5,))]
      [0.95, 0.9]
    """
    out = []
    for scale in scales:
        for cap in caps:
            s = {n: round(1.0 - (1.0 - v) * scale, 6) for n, v in sparsity.items()}
            b = {n: min(v, cap) for n, v in bits.items()}
            total = sum(estimate_bytes(sizes[n], s[n], b[n]) for n in s)
            out.append(Allocation(None, s, b, total))
    return sorted(out, key=lambda a: a.estimated_bytes)
