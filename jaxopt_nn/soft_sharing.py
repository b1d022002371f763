"""Soft weight-sharing: a learned Gaussian-mixture prior that clusters and prunes weights.

During retraining, the weights chosen by ``where`` are pulled towards the
components of a Gaussian mixture whose means, variances and mixing
proportions are learned together with them (Ullrich, Meeds & Welling 2017).
One component is fixed at zero with a large proportion and a fixed narrow
variance, so weights collapse onto it (pruning) or onto a few shared values
(weight sharing) at once.
:func:`mixture_codebooks` then turns every weight into its most responsible
component's mean: weights of the zero component are pruned, the others share
the means, ready for :func:`jaxopt_nn.archive.dumps`.

The prior is an optax transform placed before the optimiser, like weight
decay: ``optax.chain(soft_weight_sharing(...), adam(lr))``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_nn import tree as tree_lib
from jaxopt_nn.quantization import Codebook

PyTree = Any


class SoftWeightSharingState(NamedTuple):
    """Mixture parameters and their own Adam state."""

    count: jax.Array  # int32, shape ()
    means: jax.Array  # float32, shape (J,); means[0] == 0 always
    log_vars: jax.Array  # float32, shape (J,)
    logits: jax.Array  # float32, shape (J,); mixing proportions = softmax(logits)
    inner: optax.OptState  # Adam state of (means, log_vars, logits)


def _selected(tree: PyTree, where: tree_lib.Where) -> list[jax.Array]:
    flags = jax.tree.leaves(tree_lib.select(tree, where))
    return [leaf for leaf, flag in zip(jax.tree.leaves(tree), flags, strict=True) if flag]


def _log_prior(w: jax.Array, means: jax.Array, log_vars: jax.Array, logits: jax.Array) -> jax.Array:
    """Sum over ``w`` of :math:`\\log \\sum_j \\pi_j N(w; \\mu_j, \\sigma_j^2)`."""
    log_pi = jax.nn.log_softmax(logits)[None, :]
    z = (w[:, None] - means[None, :]) ** 2 / jnp.exp(log_vars)[None, :]
    log_n = -0.5 * (z + log_vars[None, :] + math.log(2 * math.pi))
    return jnp.sum(jax.nn.logsumexp(log_pi + log_n, axis=1))


def _check(
    num_components: object,
    tau: object,
    learning_rate: object,
    zero_weight: object,
    warmup_steps: object,
) -> None:
    if isinstance(num_components, bool) or not isinstance(num_components, int):
        raise TypeError(f"num_components must be an int; got num_components={num_components!r}")
    if not 2 <= num_components <= 2**16:
        raise ValueError(
            f"num_components must lie in [2, 65536]; got num_components={num_components}"
        )
    for name, value in (("tau", tau), ("learning_rate", learning_rate)):
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {name}={value!r}")
    if isinstance(zero_weight, (int, float)) and not 0 < zero_weight < 1:
        raise ValueError(f"zero_weight must lie in (0, 1); got zero_weight={zero_weight!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0; got warmup_steps={warmup_steps!r}")


def soft_weight_sharing(
    num_components: int = 16,
    *,
    tau: float = 5e-3,
    learning_rate: float = 5e-4,
    zero_weight: float = 0.99,
    warmup_steps: int = 0,
    where: tree_lib.Where = None,
) -> optax.GradientTransformation:
    r"""Add the gradient of a learned Gaussian-mixture prior to the selected weights.

    With the selected weights :math:`w_i` and a mixture of :math:`J`
    components (mean :math:`\mu_j`, variance :math:`\sigma_j^2`, proportion
    :math:`\pi_j`, with :math:`\mu_0 = 0` fixed), each update adds

    .. math::
      \tau \, \frac{\partial}{\partial w_i}
      \Big(-\log \sum_j \pi_j \, \mathcal{N}(w_i;\, \mu_j, \sigma_j^2)\Big)

    to the gradient of every selected weight, and moves the mixture
    parameters one Adam step (``learning_rate``) down the same negative log
    prior (Ullrich et al., equation 3). Means are initialised evenly over
    ``[-max|w|, max|w|]``, variances to the squared spacing :math:`\Delta^2`,
    and the zero component's proportion to ``zero_weight``.

    In place of the paper's Gamma hyper-priors on the precisions, the zero
    component's variance stays :math:`\Delta^2` (the limit of an infinitely
    strong hyper-prior) and the others' never exceed it: without this, maximum
    likelihood widens the zero component, whose proportion is near 1, until
    it covers every weight, and the hard assignment then prunes the whole
    network. :math:`\tau` ramps up linearly over ``warmup_steps`` updates, so
    the data term shapes the weights before the prior pulls them in.

    Args:
      num_components: :math:`J`, including the zero component.
      tau: weight :math:`\tau` of the prior per weight.
      learning_rate: Adam step size of the mixture parameters.
      zero_weight: initial proportion of the zero component, in ``(0, 1)``.
      warmup_steps: updates over which :math:`\tau` ramps from 0 (0: none).
      where: the weights under the prior (default: kernels).

    Returns:
      An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Raises:
      ValueError, TypeError: for out-of-range arguments.

    Example:
      >>> import optax
      >>> params = {'w': jnp.array([[0.02, -0.5], [0.48, 0.01]])}
      >>> tx = optax.chain(soft_weight_sharing(3, tau=0.1, learning_rate=0.0), optax.sgd(0.1))
      >>> @jax.jit
      ... def step(params, state):  # no data term: the prior alone
      ...     updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> state = tx.init(params)
      >>> for _ in range(300):
      ...     params, state = step(params, state)
      >>> bool(jnp.abs(params['w'][0, 0]) < 0.005), bool(jnp.abs(params['w'][1, 1]) < 0.005)
      (True, True)

    References:
      Ullrich, Meeds, Welling, "Soft Weight-Sharing for Neural Network
      Compression", ICLR, https://arxiv.org/abs/1702.04008, 2017.
      Nowlan, Hinton, "Simplifying Neural Networks by Soft Weight-Sharing",
      Neural Computation, 1992.
    """
    _check(num_components, tau, learning_rate, zero_weight, warmup_steps)
    inner = optax.adam(learning_rate)

    def init_fn(params: PyTree) -> SoftWeightSharingState:
        leaves = _selected(params, where)
        if not leaves:
            raise ValueError(f"where selects no leaf of params; got where={where!r}")
        flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
        limit = jnp.maximum(jnp.max(jnp.abs(flat)), 1e-6)
        others = jnp.linspace(-limit, limit, num_components - 1)
        means = jnp.concatenate([jnp.zeros(1), others])
        spacing = 2 * limit / max(num_components - 1, 1)
        log_vars = jnp.full(num_components, 2 * jnp.log(spacing))
        rest = (1 - zero_weight) / (num_components - 1)
        logits = jnp.log(jnp.array([zero_weight] + [rest] * (num_components - 1)))
        mixture = (means, log_vars, logits.astype(jnp.float32))
        return SoftWeightSharingState(jnp.zeros([], jnp.int32), *mixture, inner.init(mixture))

    def update_fn(
        updates: PyTree, state: Any, params: PyTree | None = None
    ) -> tuple[PyTree, SoftWeightSharingState]:
        if params is None:
            raise ValueError(
                "soft_weight_sharing needs params: call update(updates, state, params)"
            )
        flags = tree_lib.select(params, where)
        leaves = _selected(params, where)
        sizes = [x.size for x in leaves]
        flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
        mixture = (state.means, state.log_vars, state.logits)
        grad_w, grad_mix = jax.grad(lambda w, m: -_log_prior(w, *m), argnums=(0, 1))(flat, mixture)
        # The zero component's mean and variance stay put; no variance exceeds its.
        grad_mix = (grad_mix[0].at[0].set(0.0), grad_mix[1].at[0].set(0.0), grad_mix[2])
        steps, inner_state = inner.update(grad_mix, state.inner, mixture)
        means, log_vars, logits = jax.tree.map(jnp.add, mixture, steps)
        log_vars = jnp.minimum(log_vars, state.log_vars[0])
        ramp = jnp.minimum(1.0, (state.count + 1) / warmup_steps) if warmup_steps else 1.0
        pieces = iter(jnp.split(tau * ramp * grad_w, np.cumsum(sizes)[:-1]))
        out = jax.tree.map(
            lambda flag, u, p: u + next(pieces).reshape(p.shape).astype(u.dtype) if flag else u,
            flags,
            updates,
            params,
        )
        count: jax.Array = optax.safe_increment(state.count)  # pyright: ignore[reportAssignmentType]
        return out, SoftWeightSharingState(count, means, log_vars, logits, inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def mixture_codebooks(
    params: PyTree, state: SoftWeightSharingState, *, where: tree_lib.Where = None
) -> dict[str, Codebook]:
    """Hard assignment of every selected weight to its most responsible component.

    A weight whose most responsible component is the zero component is
    pruned (``mask`` False); the others share their component's mean. The
    codebook holds the means (``centroids[0] == 0`` is never used by a kept
    weight).

    Args:
      params: the parameters after training with :func:`soft_weight_sharing`.
      state: the transform's state (e.g. ``opt_state[0]`` of the chain).
      where: the same selection as the transform's.

    Returns:
      ``{leaf name: Codebook}`` for :func:`jaxopt_nn.quantization.share_weights`
      and :func:`jaxopt_nn.archive.dumps`.
    """
    log_pi = jax.nn.log_softmax(state.logits)
    out = {}
    for name, leaf in tree_lib.leaves_with_names(params):
        if name not in set(tree_lib.selected_names(params, where)):
            continue
        w = jnp.ravel(jnp.asarray(leaf, jnp.float32))
        z = (w[:, None] - state.means[None, :]) ** 2 / jnp.exp(state.log_vars)[None, :]
        score = log_pi[None, :] - 0.5 * (z + state.log_vars[None, :])
        index = jnp.argmax(score, axis=1)
        dtype = jnp.uint8 if state.means.size <= 256 else jnp.uint16
        out[name] = Codebook(
            state.means.astype(jnp.float32),
            jnp.where(index == 0, 0, index).astype(dtype).reshape(jnp.shape(leaf)),
            (index != 0).reshape(jnp.shape(leaf)),
        )
    return out
