"""Data and tensor parallelism on ``jax.sharding``, ``pmap``, and many processes.

One code path scales from one CPU to many hosts:

* :func:`make_mesh` lays the devices of every process out on a
  ``('data', 'model')`` grid;
* partition rules (:func:`tensor_parallel_rules`, :func:`partition_specs`)
  map parameter paths to ``PartitionSpec`` s, :func:`shard_params` places the
  parameters and :func:`state_shardings` makes optimizer, pruning and
  quantization states follow them (moments and masks sharded like their
  parameter);
* :func:`data_parallel_step` jits a train step with the batch split over
  ``'data'`` and the state placed as the rules say; XLA inserts the gradient
  all-reduce and the tensor-parallel collectives;
* :func:`pmean_gradients` and :func:`pmap_train_step` do the same with explicit
  collectives, for ``jax.pmap`` and ``jax.shard_map`` users;
* :func:`initialize` and :func:`global_batch` start ``jax.distributed`` and
  assemble the global batch from each process's share.

Example:
  >>> import jax, numpy as np
  >>> mesh = make_mesh(data=-1, model=1)
  >>> dict(mesh.shape) == {'data': jax.device_count(), 'model': 1}
  True
  >>> params = {'fc1': {'kernel': np.zeros((4, 8)), 'bias': np.zeros(8)},
  ...           'fc2': {'kernel': np.zeros((8, 2)), 'bias': np.zeros(2)}}
  >>> rules = tensor_parallel_rules(column=['fc1'], row=['fc2'])
  >>> specs = partition_specs(params, rules)
  >>> [tuple(specs[layer][leaf]) for layer in specs for leaf in specs[layer]]
  [('model',), (None, 'model'), (), ('model', None)]
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxopt_nn import train
from jaxopt_nn import tree as tree_lib

PyTree = Any
# (regex, spec) pairs; a spec may be a function of the leaf's shape.
Rules = Sequence[tuple[str, P | Callable[[tuple[int, ...]], P]]]
StepFn = Callable[[Any, Any, Any], tuple[Any, dict[str, jax.Array]]]

DATA = "data"
MODEL = "model"


def make_mesh(
    data: int = -1,
    model: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    axis_names: tuple[str, str] = (DATA, MODEL),
) -> Mesh:
    """A ``data x model`` device mesh with ``Auto`` axes (sharding propagated by XLA).

    Args:
      data: size of the data-parallel axis; ``-1`` takes every device not used
        by ``model``.
      model: size of the tensor-parallel axis.
      devices: the devices to lay out; default ``jax.devices()``, i.e. every
        device of every process in a multi-process run.
      axis_names: names of the two axes.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(data, model)``.

    Raises:
      ValueError: if ``data`` or ``model`` is not a positive int (or ``-1``
        for ``data``), or ``data * model`` differs from the number of devices.

    Example:
      >>> mesh = make_mesh(data=1, model=1, devices=jax.devices()[:1])
      >>> mesh.axis_names, dict(mesh.shape)
      (('data', 'model'), {'data': 1, 'model': 1})
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if not isinstance(model, int) or model < 1:
        raise ValueError(f"model must be a positive int; got model={model!r}")
    if not isinstance(data, int) or (data < 1 and data != -1):
        raise ValueError(f"data must be a positive int or -1; got data={data!r}")
    if data == -1:
        if n % model:
            raise ValueError(f"model must divide the number of devices ({n}); got model={model}")
        data = n // model
    if data * model != n:
        raise ValueError(
            f"data * model must equal the number of devices ({n}); got data={data}, model={model}"
        )
    return jax.make_mesh(
        (data, model), tuple(axis_names), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def tensor_parallel_rules(
    *,
    column: Iterable[str] = (),
    row: Iterable[str] = (),
    conv: Iterable[str] = (),
    axis: str = MODEL,
) -> list[tuple[str, P | Callable[[tuple[int, ...]], P]]]:
    """Megatron-style partition rules for Dense pairs and convolutions.

    A column-parallel Dense layer splits its output features over ``axis``
    (kernel ``(in, out)`` -> ``P(None, axis)``, bias -> ``P(axis)``); the
    row-parallel layer after it splits its input features (kernel ->
    ``P(axis, None)``, bias replicated), so the pair needs a single all-reduce
    after the second matmul. A convolution splits its output channels (kernel
    ``(..., in, out)`` -> ``P(None, ..., axis)``, bias -> ``P(axis)``).

    Args:
      column: regexes of the column-parallel layers' paths (``'fc1'``,
        ``'blocks/\\d+/mlp_in'``).
      row: regexes of the row-parallel layers' paths.
      conv: regexes of convolution layers' paths (kernel rank 3, 4 or 5).
      axis: the mesh axis the layers are split over.

    Returns:
      Rules ``[(regex, PartitionSpec), ...]`` for :func:`partition_specs`.

    References:
      Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language
      Models Using Model Parallelism", https://arxiv.org/abs/1909.08053, 2019
      (Section 3, Figure 3a: column- then row-parallel MLP).

    Example:
      >>> [(regex, tuple(spec)) for regex, spec in tensor_parallel_rules(row=['fc2'])]
      [('(^|/)(fc2)/kernel$', ('model', None))]
    """
    rules: list[tuple[str, P | Callable[[tuple[int, ...]], P]]] = []
    for name in column:
        rules += [
            (_layer_regex(name, "kernel"), P(None, axis)),
            (_layer_regex(name, "bias"), P(axis)),
        ]
    for name in row:
        rules.append((_layer_regex(name, "kernel"), P(axis, None)))
    for name in conv:
        rules += [
            (_layer_regex(name, "kernel"), _last_axis_spec(axis)),
            (_layer_regex(name, "bias"), P(axis)),
        ]
    return rules


def _last_axis_spec(axis: str) -> Callable[[tuple[int, ...]], P]:
    """``shape -> P(None, ..., axis)`` of the leaf's rank (conv kernels of any rank)."""
    return lambda shape: P(*([None] * (len(shape) - 1)), axis)


def _layer_regex(name: str, leaf: str) -> str:
    return f"(^|/)({name})/{leaf}$"


def partition_specs(tree: PyTree, rules: Rules = ()) -> PyTree:
    """The ``PartitionSpec`` of every leaf: the first rule whose regex matches its path.

    Paths are the names of :func:`jaxopt_nn.tree.path_name`
    (``'fc1/kernel'``); a rule matches when ``re.search(regex, path)`` does.
    Leaves no rule matches, and scalars, are replicated (``P()``).

    Args:
      tree: a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` s).
      rules: ``[(regex, spec), ...]`` where ``spec`` is a ``PartitionSpec``
        or a function of the leaf's shape returning one, e.g. from
        :func:`tensor_parallel_rules`.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``tree``.

    Raises:
      ValueError: if a matched spec has more entries than its leaf has axes.

    Example:
      >>> import numpy as np
      >>> specs = partition_specs({'w': np.zeros((4, 2)), 'b': np.zeros(2)}, [('w', P('model'))])
      >>> specs['w'] == P('model'), specs['b'] == P()
      (True, True)
    """
    return tree_lib.map_with_names(_spec_fn(rules), tree)


def _spec_fn(rules: Rules) -> Callable[[str, Any], P]:
    compiled = [(re.compile(regex), spec) for regex, spec in rules]

    def spec_of(name: str, leaf: Any) -> P:
        ndim = np.ndim(leaf)
        for regex, spec in compiled:
            if ndim and regex.search(name):
                if not isinstance(spec, P):
                    spec = spec(np.shape(leaf))
                if len(spec) > ndim:
                    raise ValueError(
                        f"rule {regex.pattern!r} gives spec={spec} with {len(spec)} "
                        f"entries to {name!r} of shape {np.shape(leaf)}; "
                        f"a spec may have at most ndim={ndim} entries"
                    )
                return spec
        return P()

    return spec_of


def param_shardings(tree: PyTree, mesh: Mesh, rules: Rules = ()) -> PyTree:
    """``NamedSharding`` s of the leaves of ``tree`` on ``mesh`` per ``rules``.

    Args:
      tree: a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` s).
      mesh: the device mesh.
      rules: as in :func:`partition_specs`.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``tree``.

    Raises:
      ValueError: if a spec names an axis the mesh lacks, or a sharded
        dimension is not divisible by the size of its mesh axes.
    """

    def sharding_of(name: str, leaf: Any, spec: P) -> NamedSharding:
        for dim, axes in zip(np.shape(leaf), spec, strict=False):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            for ax in axes:
                if ax not in mesh.shape:
                    raise ValueError(
                        f"spec={spec} of {name!r} names axis {ax!r}; "
                        f"the mesh has axes {tuple(mesh.axis_names)}"
                    )
            size = int(np.prod([mesh.shape[ax] for ax in axes]))
            if dim % size:
                raise ValueError(
                    f"{name!r} of shape {np.shape(leaf)} cannot take spec={spec}: "
                    f"dimension {dim} is not divisible by mesh axes {axes} of size {size}"
                )
        return NamedSharding(mesh, spec)

    return tree_lib.map_with_names(sharding_of, tree, partition_specs(tree, rules))


def shard_params(params: PyTree, mesh: Mesh, rules: Rules = ()) -> PyTree:
    """Place ``params`` on ``mesh`` as ``rules`` say (replicated where no rule matches).

    Example:
      >>> import numpy as np
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> sharded = shard_params({'w': np.ones((2, 2))}, mesh, [('w', P(None, 'model'))])
      >>> sharded['w'].sharding.spec == P(None, 'model')
      True
    """
    return jax.device_put(params, param_shardings(params, mesh, rules))


def state_shardings(state: PyTree, params: PyTree, shardings: PyTree) -> PyTree:
    """Shardings for ``state`` that follow the shardings of ``params``.

    Works for any optimizer, pruning or quantization state without knowing its
    type: a leaf of ``state`` whose path contains the path of a parameter (as
    a run of whole path components: ``'0/mu/fc1/kernel'``,
    ``'masks/fc1/kernel'``, ``'fc1/kernel/indices'``) and whose shape equals
    that parameter's gets the parameter's sharding; the longest such parameter
    path wins. A leaf that differs from the parameter only in the length of
    the last axis (the codes and block scales of a quantized moment,
    ``'0/mu/fc1/kernel/scales'``) is sharded like it on the leading axes, and
    on the last axis too where the mesh divides its length. Every other leaf
    (counts, scalars, codebook centroids) is replicated.

    Args:
      state: a pytree of arrays or ``jax.ShapeDtypeStruct`` s, e.g.
        ``jax.eval_shape(tx.init, params)``.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct`` s).
      shardings: ``NamedSharding`` s of ``params``, e.g. from
        :func:`param_shardings`.

    Returns:
      A pytree of ``NamedSharding`` with the structure of ``state``.

    Raises:
      ValueError: if ``params`` has no leaves (there is no mesh to follow).

    Example:
      >>> import numpy as np, optax
      >>> mesh = make_mesh(devices=jax.devices()[:1])
      >>> params = {'w': np.ones((2, 4))}
      >>> shardings = param_shardings(params, mesh, [('w', P(None, 'model'))])
      >>> opt = state_shardings(optax.adam(1e-3).init(params), params, shardings)
      >>> opt[0].count.spec == P(), opt[0].mu['w'].spec == P(None, 'model')
      (True, True)
    """
    entries = [
        (tuple(name.split("/")), np.shape(leaf), sharding)
        for (name, leaf), sharding in zip(
            tree_lib.leaves_with_names(params), jax.tree.leaves(shardings), strict=True
        )
    ]
    if not entries:
        raise ValueError(f"params must have at least one leaf; got params={params!r}")
    entries.sort(key=lambda e: -len(e[0]))
    mesh = entries[0][2].mesh
    replicated = NamedSharding(mesh, P())

    def follow(name: str, leaf: Any) -> NamedSharding:
        parts, shape = tuple(name.split("/")), np.shape(leaf)
        for key, param_shape, sharding in entries:
            if not _contains_run(parts, key):
                continue
            if param_shape == shape:
                return sharding
            if shape and len(shape) == len(param_shape) and shape[:-1] == param_shape[:-1]:
                return NamedSharding(sharding.mesh, _last_axis_fitted(sharding.spec, shape, mesh))
        return replicated

    return tree_lib.map_with_names(follow, state)


def _last_axis_fitted(spec: P, shape: tuple[int, ...], mesh: Any) -> P:
    """``spec`` with its last-axis entry dropped unless the mesh axes divide ``shape[-1]``."""
    entries = (list(spec) + [None] * len(shape))[: len(shape)]
    last = entries[-1]
    names = () if last is None else (last,) if isinstance(last, str) else tuple(last)
    if shape[-1] % int(np.prod([mesh.shape[name] for name in names])):
        entries[-1] = None
    return P(*entries)


def _contains_run(parts: tuple[str, ...], key: tuple[str, ...]) -> bool:
    k = len(key)
    return any(parts[i : i + k] == key for i in range(len(parts) - k + 1))


def train_state_shardings(state: Any, mesh: Mesh, rules: Rules = ()) -> Any:
    """Shardings of a ``TrainState(params, rest, opt_state)``.

    ``params`` and ``rest`` (batch statistics) follow ``rules``; ``opt_state``
    follows the params (:func:`state_shardings`).

    Args:
      state: a ``jaxopt_nn.train.TrainState`` (or any ``NamedTuple`` with
        ``params``, ``rest`` and ``opt_state`` fields), arrays or shapes.
      mesh: the device mesh.
      rules: partition rules for the params (see :func:`partition_specs`).

    Returns:
      A ``TrainState`` of ``NamedSharding`` s, for ``jax.device_put`` or
      :func:`data_parallel_step`.
    """
    params = param_shardings(state.params, mesh, rules)
    return state._replace(
        params=params,
        rest=param_shardings(state.rest, mesh, rules),
        opt_state=state_shardings(state.opt_state, state.params, params),
    )


def batch_sharding(mesh: Mesh, *, data_axis: str = DATA) -> NamedSharding:
    """The sharding of a batch: leading axis split over ``data_axis``, rest replicated."""
    return NamedSharding(mesh, P(data_axis))


def data_parallel_step(
    step_fn: StepFn,
    mesh: Mesh,
    shardings: Any = None,
    *,
    data_axis: str = DATA,
    donate: bool = True,
) -> StepFn:
    """Jit ``step_fn(state, x, y) -> (state, metrics)`` for data (and tensor) parallelism.

    The batch ``x, y`` is split along its leading axis over ``data_axis``; the
    state is placed by ``shardings`` (replicated when ``None``). The step is
    the same program as on one device: XLA partitions it and inserts the
    all-reduce of the gradients (and, with tensor-parallel rules, the
    collectives of the sharded matmuls), so the result equals single-device
    training up to floating-point summation order.

    Args:
      step_fn: an unjitted train step, e.g.
        ``train.make_train_step(graphdef, tx, jit=False)`` for any optax
        ``tx`` (including ``jaxopt_nn`` optimizers and ``prune``).
      mesh: the device mesh (:func:`make_mesh`).
      shardings: ``NamedSharding`` s of the state (a pytree, or a prefix of
        it), e.g. from :func:`train_state_shardings`; ``None`` replicates it.
      data_axis: the mesh axis that splits the batch.
      donate: donate the input state's buffers to the output.

    Returns:
      The jitted ``step(state, x, y) -> (state, metrics)``. The state must be
      host arrays, uncommitted arrays, or placed by ``shardings``
      (``jax.device_put(state, shardings)``). ``x`` and ``y`` may be host
      arrays (of the global batch, on one process) or global ``jax.Array`` s
      from :func:`global_batch`; the batch size must be divisible by the size
      of ``data_axis``. Metrics come back replicated.

    Raises:
      ValueError: if ``data_axis`` is not an axis of ``mesh``.
    """
    if data_axis not in mesh.shape:
        raise ValueError(
            f"data_axis must be one of the mesh axes {tuple(mesh.axis_names)}; "
            f"got data_axis={data_axis!r}"
        )
    replicated = NamedSharding(mesh, P())
    state_sh = replicated if shardings is None else shardings
    batch = batch_sharding(mesh, data_axis=data_axis)
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, batch, batch),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,) if donate else (),
    )


def global_batch(local: PyTree, mesh: Mesh, *, data_axis: str = DATA) -> PyTree:
    """Assemble a global batch from each process's share, split over ``data_axis``.

    Each process passes its own rows (``global_batch / process_count`` of
    them); the result is one global ``jax.Array`` per leaf whose leading axis
    is the concatenation over processes, in process order. On one process it
    just places the batch.

    Args:
      local: a pytree of host arrays with the process-local rows.
      mesh: the device mesh.
      data_axis: the mesh axis that splits the batch.

    Returns:
      The pytree of global ``jax.Array`` s, sharded by :func:`batch_sharding`.

    Example:
      >>> import numpy as np
      >>> mesh = make_mesh()
      >>> x = global_batch(np.ones((2 * jax.device_count(), 3)), mesh)
      >>> x.shape == (2 * jax.device_count(), 3), x.sharding.spec == P('data')
      (True, True)
    """
    sharding = batch_sharding(mesh, data_axis=data_axis)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local
    )


def _env_int(variable: str) -> int | None:
    """The integer in environment ``variable``, ``None`` if unset."""
    text = os.environ.get(variable)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{variable} must be an integer; got {variable}={text!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    auto_detect: bool = False,
    initialization_timeout: int = 300,
) -> bool:
    """Start ``jax.distributed`` when there is more than one process; no-op otherwise.

    Arguments left ``None`` are read from ``JAX_COORDINATOR_ADDRESS``
    (``host:port`` of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With one process (or nothing configured and
    ``auto_detect=False``) nothing is started, so the same script runs on a
    laptop and on a cluster. Call it first, before any other JAX call.

    Args:
      coordinator_address: ``'host:port'`` of process 0.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: devices this process drives (default: all visible).
      cpu_collectives: cross-process collectives on CPU (``'gloo'`` or
        ``'mpi'``), or ``None`` to keep JAX's setting.
      auto_detect: with nothing configured, let JAX detect the cluster
        (SLURM, Open MPI, Kubernetes, Cloud TPU) instead of running alone.
      initialization_timeout: seconds to wait for all processes to connect.

    Returns:
      Whether ``jax.distributed`` is running (``False``: single process).

    Raises:
      ValueError: if ``num_processes`` is below 1, ``process_id`` is outside
        ``[0, num_processes)``, only part of the three is configured, or
        ``cpu_collectives`` is unknown.

    Example:
      >>> initialize(num_processes=1)
      False
    """
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if cpu_collectives not in (None, "gloo", "mpi"):
        raise ValueError(
            "cpu_collectives must be 'gloo', 'mpi' or None; "
            f"got cpu_collectives={cpu_collectives!r}"
        )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1; got num_processes={num_processes}")
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    configured = (coordinator_address, num_processes, process_id)
    if all(v is None for v in configured):
        if not auto_detect:
            return False
    elif coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError(
            "coordinator_address, num_processes and process_id must be given together; "
            f"got coordinator_address={coordinator_address!r}, "
            f"num_processes={num_processes!r}, process_id={process_id!r}"
        )
    elif not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id must lie in [0, {num_processes}); got process_id={process_id}"
        )
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    return True


def pmean_gradients(
    inner: optax.GradientTransformation, *, axis_name: str = DATA
) -> optax.GradientTransformationExtraArgs:
    """Average the gradients over ``axis_name`` (``lax.pmean``) before ``inner``.

    .. math::

      g \\leftarrow \\frac{1}{R} \\sum_{r=1}^{R} g_r

    For explicit-collective data parallelism under ``jax.pmap`` or
    ``jax.shard_map``: with it, every replica applies the same update and the
    replicas stay equal. The state is ``inner``'s own, so a train state built
    with ``inner`` works unchanged.

    Under ``jax.shard_map`` pass ``check_vma=False`` (per-replica gradients,
    as in ``pmap``): with ``check_vma=True`` JAX already sums the gradients of
    replicated (unvarying) parameters across the axis, and averaging them
    again would scale the update by the number of replicas.

    Args:
      inner: the optimizer (any optax transform, e.g. ``jaxopt_nn`` ``adam``
        chained with ``prune``).
      axis_name: the mapped axis of ``pmap`` / ``shard_map`` to average over.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its ``update`` must run
      inside a ``pmap`` or ``shard_map`` that binds ``axis_name``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> tx = pmean_gradients(optax.sgd(1.0), axis_name='i')
      >>> params = jnp.zeros(2)
      >>> update = jax.vmap(lambda g: tx.update(g, tx.init(params))[0], axis_name='i')
      >>> update(jnp.array([[1.0, 2.0], [3.0, 4.0]]))
      Array([[-2., -3.],
             [-2., -3.]], dtype=float32)
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        updates = jax.lax.pmean(updates, axis_name)
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def pmap_train_step(
    graphdef: Any,
    tx: optax.GradientTransformation,
    *,
    loss_fn: Callable[..., Any] | None = None,
    param_transform: Callable[[PyTree], PyTree] | None = None,
    axis_name: str = DATA,
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
    donate: bool = True,
) -> StepFn:
    """``jax.pmap`` data-parallel train step with ``lax.pmean`` of the gradients.

    The step of :func:`jaxopt_nn.train.make_train_step` with
    :func:`pmean_gradients` around ``tx``; the metrics and the batch statistics
    (``nnx.BatchStat``) are averaged over the replicas too, so the replicas
    stay equal. Inside the step every replica folds its index into the
    model's RNG keys (``nnx.RngKey``), so dropout draws a different mask on
    each device's examples, as one device would for the whole batch; the
    stored keys (and counts) stay the same on every replica.

    Args:
      graphdef: the model's graph definition (``train.init_train_state``).
      tx: the optimizer; the state must come from ``tx.init`` (as usual).
      loss_fn: as in ``train.make_train_step``.
      param_transform: as in ``train.make_train_step``.
      axis_name: name of the mapped device axis.
      devices: devices to map over (default: all local devices).
      donate: donate the input state's buffers.

    Returns:
      ``step(state, x, y) -> (state, metrics)`` over replicated state (leading
      device axis, see :func:`replicate`) and per-device batches ``x`` of
      shape ``(num_devices, per_device_batch, ...)`` (see :func:`split_batch`);
      metrics come back with a leading device axis, equal on every replica.
    """
    inner = train.make_train_step(
        graphdef,
        pmean_gradients(tx, axis_name=axis_name),
        loss_fn=loss_fn,
        param_transform=param_transform,
        jit=False,
    )

    def map_variables(fn, *trees):
        return jax.tree.map(fn, *trees, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def step(state, x, y):
        index = jax.lax.axis_index(axis_name)
        local_keys = map_variables(
            lambda v: (
                jax.tree.map(lambda k: jax.random.fold_in(k, index), v)
                if isinstance(v, nnx.RngKey)
                else v
            ),
            state.rest,
        )
        new, metrics = inner(state._replace(rest=local_keys), x, y)
        rest = map_variables(
            lambda v, old: (
                old
                if isinstance(v, nnx.RngKey)
                else jax.tree.map(partial(jax.lax.pmean, axis_name=axis_name), v)
                if isinstance(v, nnx.BatchStat)
                else v
            ),
            new.rest,
            state.rest,
        )
        return new._replace(rest=rest), jax.lax.pmean(metrics, axis_name)

    return jax.pmap(
        step, axis_name=axis_name, devices=devices, donate_argnums=(0,) if donate else ()
    )


def replicate(tree: PyTree, *, devices: Sequence[jax.Device] | None = None) -> PyTree:  # pyright: ignore[reportInvalidTypeForm]
    """Copy every leaf onto each device along a new leading axis (``pmap`` input).

    Example:
      >>> import numpy as np
      >>> replicate({'w': np.ones(3)})['w'].shape == (jax.local_device_count(), 3)
      True
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), P("replica"))
    n = len(devices)

    def copies(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            stacked = jnp.broadcast_to(x[None], (n, *x.shape))  # typed keys have no NumPy form
        else:
            stacked = np.broadcast_to(np.asarray(x)[None], (n, *np.shape(x)))
        return jax.device_put(stacked, sharding)

    return jax.tree.map(copies, tree)


def unreplicate(tree: PyTree) -> PyTree:
    """The first replica of every leaf (inverse of :func:`replicate`)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_batch(batch: PyTree, num_devices: int) -> PyTree:
    """Reshape leading axis ``B`` to ``(num_devices, B // num_devices)`` for ``pmap``.

    Raises:
      ValueError: if ``num_devices`` does not divide a leaf's leading axis.

    Example:
      >>> import numpy as np
      >>> split_batch(np.zeros((6, 5)), 2).shape
      (2, 3, 5)
    """

    def split(x: Any) -> Any:
        if np.shape(x)[0] % num_devices:
            raise ValueError(
                f"num_devices must divide the batch size {np.shape(x)[0]}; "
                f"got num_devices={num_devices}"
            )
        return x.reshape(num_devices, np.shape(x)[0] // num_devices, *np.shape(x)[1:])

    return jax.tree.map(split, batch)
