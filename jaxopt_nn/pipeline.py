"""Deep Compression, end to end: train -> prune -> share weights -> Huffman archive.

:func:`deep_compress` runs the three stages of Han, Mao & Dally (2016) on any
NNX model and :class:`~jaxopt_nn.data.Dataset`:

1. **dense training** with Adam;
2. **gradual magnitude pruning with retraining**: every selected kernel is
   pruned by its own Zhu & Gupta polynomial schedule to its own target
   (:func:`default_sparsity`: the output layer is pruned least, convolutions
   less than fully connected layers), then retrained at the final masks;
3. **k-means weight sharing** (:func:`~jaxopt_nn.quantization.kmeans_tree`,
   linear initialisation; :func:`default_bits`: 8 bits for convolutions,
   5 bits for fully connected layers) with **centroid fine-tuning** (each
   centroid moves by the sum of its members' gradients);
4. the **archive**: relative sparse indices and codebook indices, both
   Huffman-coded (:mod:`jaxopt_nn.archive`), small leaves in float16.

The archive is then loaded back and evaluated: the last stage's accuracy is
the accuracy of the weights in the file, and the reported bytes are the
file's bytes.

References:
  Han, Mao, Dally, "Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding", ICLR,
  https://arxiv.org/abs/1510.00149, 2016.
  Zhu, Gupta, "To prune, or not to prune", https://arxiv.org/abs/1710.01878, 2017.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_nn import archive, pruning, quantization, train
from jaxopt_nn import tree as tree_lib
from jaxopt_nn.data import Dataset
from jaxopt_nn.optim import adam

PyTree = Any

# Deep Compression prunes LeNet-300-100 to 92% / 91% / 74% (Table 2); with gradual
# pruning and retraining 95% / 95% / 85% keeps the accuracy (benchmarks/pipeline.py).
_FC_SPARSITY = 0.95
_OUTPUT_SPARSITY = 0.85
_CONV_SPARSITY = 0.7
_FC_BITS = 5
_CONV_BITS = 8


def default_sparsity(params: PyTree, where: tree_lib.Where = None) -> dict[str, float]:
    """Per-layer pruning targets: fc 95%, the output layer 85%, convolutions 70%.

    The output layer (the last selected leaf) holds few weights that each
    matter much; convolution kernels are shared over positions and so prune
    less (Deep Compression, Tables 2-5).

    Example:
      >>> import jax.numpy as jnp
      >>> default_sparsity({'conv': {'kernel': jnp.zeros((3, 3, 1, 8))},
      ...                   'fc1': {'kernel': jnp.zeros((8, 4))},
      ...                   'fc2': {'kernel': jnp.zeros((4, 2))}})
      {'conv/kernel': 0.7, 'fc1/kernel': 0.95, 'fc2/kernel': 0.85}
    """
    named = [(n, leaf) for n, leaf in tree_lib.leaves_with_names(params)]
    flags = jax.tree.leaves(tree_lib.select(params, where))
    selected = [(n, leaf) for (n, leaf), flag in zip(named, flags, strict=True) if flag]
    out = {}
    for i, (name, leaf) in enumerate(selected):
        if np.ndim(leaf) > 2:
            out[name] = _CONV_SPARSITY
        elif i == len(selected) - 1:
            out[name] = _OUTPUT_SPARSITY
        else:
            out[name] = _FC_SPARSITY
    return out


def default_bits(params: PyTree, where: tree_lib.Where = None) -> dict[str, int]:
    """Per-layer codebook widths: 8 bits for convolutions, 5 for fully connected.

    Example:
      >>> import jax.numpy as jnp
      >>> default_bits({'conv': jnp.zeros((3, 3, 1, 8)), 'fc': jnp.zeros((8, 4))})
      {'conv': 8, 'fc': 5}
    """
    return {
        name: _CONV_BITS if np.ndim(leaf) > 2 else _FC_BITS
        for name, leaf in tree_lib.leaves_with_names(params)
        if name in set(tree_lib.selected_names(params, where))
    }


class StageResult(NamedTuple):
    """Accuracy and storage after one stage of :func:`deep_compress`."""

    name: str  # 'dense', 'pruned', 'shared', 'archive'
    accuracy: float  # test accuracy in [0, 1]
    nbytes: int  # bytes of the model at this stage (see CompressionReport)
    seconds: float  # wall time of the stage


class CompressionReport(NamedTuple):
    """What :func:`deep_compress` measured.

    Stage sizes: ``dense`` is the float32 size of every leaf; ``pruned`` the
    size of a lossless sparse archive of the pruned model; ``shared`` and
    ``archive`` the size of the final file, whose weights give the
    ``archive`` accuracy (evaluated after loading it back).
    """

    stages: list[StageResult]
    info: archive.ArchiveInfo  # per-tensor byte accounting of the file
    original_bytes: int  # float32 bytes of all leaves
    sparsity: dict[str, float]  # pruning target per kernel
    bits: dict[str, int]  # codebook width per kernel
    weights: dict[str, np.ndarray]  # selected weights (flat) after 'dense', 'pruned', 'shared'

    @property
    def compression(self) -> float:
        """``original_bytes / file bytes``."""
        return self.original_bytes / self.info.file_bytes

    def stage(self, name: str) -> StageResult:
        """The :class:`StageResult` called ``name``."""
        return next(s for s in self.stages if s.name == name)

    def summary(self) -> str:
        """One line: ``compression NNx, accuracy A% -> B%``."""
        dense, final = self.stage("dense").accuracy, self.stage("archive").accuracy
        return f"compression {self.compression:.1f}x, accuracy {dense:.2%} -> {final:.2%}"

    def table(self) -> str:
        """Per-layer table in the style of Deep Compression's Table 2."""
        rows = []
        for t in self.info.tensors:
            rows.append(
                [
                    t.name,
                    t.size,
                    f"{100 * t.kept / max(t.size, 1):.1f}%",
                    str(self.bits.get(t.name.removeprefix("params/"), "-")),
                    f"{t.weight_bits:.2f}",
                    f"{t.index_bits:.2f}" if t.method != "raw" else "-",
                    t.nbytes,
                    f"{4 * t.size / t.nbytes:.1f}x",
                ]
            )
        rows.append(["(header)", "", "", "", "", "", self.info.header_bytes, ""])
        size = sum(t.size for t in self.info.tensors)
        kept = sum(t.kept for t in self.info.tensors)
        rows.append(
            [
                "total",
                size,
                f"{100 * kept / max(size, 1):.1f}%",
                "",
                "",
                "",
                self.info.file_bytes,
                f"{self.compression:.1f}x",
            ]
        )
        headers = [
            "layer",
            "weights",
            "kept",
            "bits",
            "weight bits",
            "index bits",
            "bytes",
            "compression",
        ]
        return tree_lib.format_table(headers, rows)

    def stage_table(self) -> str:
        """Accuracy, size and time after every stage."""
        rows = [
            [
                s.name,
                f"{s.accuracy:.2%}",
                s.nbytes,
                f"{self.original_bytes / s.nbytes:.1f}x",
                f"{s.seconds:.1f}",
            ]
            for s in self.stages
        ]
        return tree_lib.format_table(["stage", "accuracy", "bytes", "compression", "seconds"], rows)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no weight arrays)."""
        return {
            "compression": self.compression,
            "original_bytes": self.original_bytes,
            "file_bytes": self.info.file_bytes,
            "header_bytes": self.info.header_bytes,
            "stages": [s._asdict() for s in self.stages],
            "layers": [
                {
                    **t._asdict(),
                    "shape": list(t.shape),
                    "bits": self.bits.get(t.name.removeprefix("params/")),
                }
                for t in self.info.tensors
            ],
            "sparsity": self.sparsity,
        }


def _check_epochs(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}")


def _per_layer(
    value: float | int | Mapping[str, Any] | None,
    defaults: dict[str, Any],
    name: str,
    check: Callable[[str, Any], None],
) -> dict[str, Any]:
    """Resolve a number or a path -> value mapping against the selected layers."""
    if value is None:
        out = dict(defaults)
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - set(defaults))
        if unknown:
            raise ValueError(
                f"{name} names layers that are not selected: {unknown}; "
                f"selected: {sorted(defaults)}"
            )
        out = {**defaults, **value}
    else:
        out = dict.fromkeys(defaults, value)
    for layer, v in out.items():
        check(f"{name}[{layer!r}]", v)
    return out


def check_output_path(name: str, path: str | os.PathLike) -> None:
    """Raise unless ``path`` names a file in an existing directory (checked before long runs).

    Args:
      name: the argument's name, for the message.
      path: the file to be written.

    Raises:
      ValueError: if the directory does not exist or ``path`` is a directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{name} must be in an existing directory; got {name}={str(path)!r}")
    if os.path.isdir(path):
        raise ValueError(f"{name} must be a file path, not a directory; got {name}={str(path)!r}")


def _check_sparsity(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")


def _check_bits(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
        raise ValueError(f"{name} must be an integer in [1, 8]; got {value!r}")


def _flat_selected(params: PyTree, names: list[str]) -> np.ndarray:
    leaves = dict(tree_lib.leaves_with_names(params))
    return np.concatenate([np.asarray(leaves[n], np.float32).ravel() for n in names])


def _archive_tree(params: nnx.State, rest: nnx.State) -> dict[str, Any]:
    """The stored tree: ``{'params': ...}`` plus ``'rest'`` (batch statistics) if any."""
    tree = {"params": nnx.to_pure_dict(params)}
    rest = nnx.to_pure_dict(rest)
    if jax.tree.leaves(rest):
        tree["rest"] = rest
    return tree


def _replace(state: nnx.State, stored: Mapping[str, Any], what: str) -> None:
    """``nnx.replace_by_pure_dict`` after checking that names and shapes agree."""
    expected = {n: np.shape(v) for n, v in tree_lib.leaves_with_names(state)}
    found = {n: np.shape(v) for n, v in tree_lib.leaves_with_names(stored)}
    if expected != found:
        diff = sorted(
            f"{n}: model {expected.get(n)}, archive {found.get(n)}"
            for n in expected.keys() | found.keys()
            if expected.get(n) != found.get(n)
        )
        raise ValueError(f"archive {what} do not fit the model: " + "; ".join(diff[:4]))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(stored)))


def restore_state(like: train.TrainState, stored: Mapping[str, Any]) -> train.TrainState:
    """A :class:`~jaxopt_nn.train.TrainState` holding the weights of a loaded archive.

    Args:
      like: a state of the same model (e.g. from
        :func:`jaxopt_nn.train.init_train_state`); its params and batch
        statistics are overwritten in place, ``opt_state`` is kept.
      stored: the tree :func:`jaxopt_nn.archive.load` returned for an archive
        written by :func:`deep_compress`.

    Returns:
      The state with the archive's params (and batch statistics).

    Raises:
      ValueError: if the archive's leaves are not the model's (names or
        shapes), or it lacks the batch statistics the model has.
    """
    if not isinstance(stored, Mapping) or "params" not in stored:
        raise ValueError("archive holds no 'params' tree; was it written by deep_compress?")
    _replace(like.params, stored["params"], "params")
    if "rest" in stored:
        _replace(like.rest, stored["rest"], "batch statistics")
    elif jax.tree.leaves(like.rest):
        raise ValueError(
            f"archive holds no batch statistics ('rest'), but the model has "
            f"{len(jax.tree.leaves(like.rest))} such leaves (e.g. BatchNorm); "
            "was it written for another model?"
        )
    return like


def deep_compress(
    model: nnx.Module,
    data: Dataset,
    *,
    sparsity: float | Mapping[str, float] | None = None,
    bits: int | Mapping[str, int] | None = None,
    where: tree_lib.Where = None,
    epochs: int = 30,
    prune_epochs: int = 60,
    finetune_epochs: int = 15,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    small_dtype: str | None = "float16",
    seed: int = 0,
    path: str | os.PathLike | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> CompressionReport:
    r"""Compress ``model`` on ``data`` with pruning, weight sharing and Huffman coding.

    Stages (each evaluated on ``data``'s test split):

    * ``dense``: ``epochs`` of Adam at ``learning_rate``;
    * ``pruned``: ``prune_epochs`` of Adam chained with one
      :func:`~jaxopt_nn.pruning.prune` per kernel, each with a Zhu & Gupta
      schedule ramping to its target over the first 60% of the epochs; the
      remaining 40% retrain at the final masks. Pruned weights are exactly 0;
    * ``shared``: k-means codebooks (linear init) per kernel over its kept
      weights, then ``finetune_epochs`` training the centroids (and biases);
    * ``archive``: the model saved with :func:`jaxopt_nn.archive.dumps`
      (codebook leaves Huffman-coded; other leaves raw in ``small_dtype``),
      loaded back and evaluated.

    Compression is the float32 size of every leaf over the archive's size,
    header included.

    Args:
      model: an NNX model (not modified).
      data: train and test split.
      sparsity: one target for every kernel, or ``{layer: target}``
        overriding :func:`default_sparsity`; each in ``[0, 1)``.
      bits: one codebook width, or ``{layer: width}`` overriding
        :func:`default_bits`; each in ``[1, 8]``.
      where: which leaves are pruned and shared (default: kernels).
      epochs: dense training epochs (``>= 1``).
      prune_epochs: pruning and retraining epochs (``>= 2``).
      finetune_epochs: centroid fine-tuning epochs (``>= 0``).
      batch_size: examples per step.
      learning_rate: Adam's step size in every stage.
      small_dtype: float type of the leaves stored raw (biases), or ``None``
        to keep float32.
      seed: seeds the data order of every stage.
      path: where to write the archive (atomically); ``None`` writes nothing.
      metadata: JSON-serialisable dict stored in the archive's header (the
        command line stores the model's name there).
      progress: draw progress bars.

    Returns:
      A :class:`CompressionReport`.

    Raises:
      ValueError: for out-of-range arguments, a ``where`` that selects
        nothing, or a ``path`` outside an existing directory; all checked
        before training.
      TypeError: if ``metadata`` is not a JSON-serialisable dict.
    """
    _check_epochs("epochs", epochs, 1)
    _check_epochs("prune_epochs", prune_epochs, 2)
    _check_epochs("finetune_epochs", finetune_epochs, 0)
    if (
        isinstance(learning_rate, bool)
        or not isinstance(learning_rate, (int, float))
        or not (math.isfinite(learning_rate) and learning_rate > 0)
    ):
        raise ValueError(f"learning_rate must be a positive number; got {learning_rate!r}")
    # The archive's own checks, run before training rather than after it.
    archive._check_raw_dtype(small_dtype, "small_dtype")
    metadata = archive._check_metadata(metadata)
    if path is not None:
        check_output_path("path", path)
    params0 = nnx.state(model, nnx.Param)
    names = tree_lib.selected_names(params0, where)
    if not names:
        raise ValueError(f"where selects no leaf of the model's params; got where={where!r}")
    targets = _per_layer(sparsity, default_sparsity(params0, where), "sparsity", _check_sparsity)
    widths = _per_layer(bits, default_bits(params0, where), "bits", _check_bits)
    fit_kwargs = {"batch_size": batch_size, "seed": seed, "progress": progress}
    tx = adam(learning_rate)
    original_bytes = 4 * tree_lib.count_params(nnx.state(model))
    stages, weights = [], {}

    def record(name: str, accuracy: float, nbytes: int, start: float) -> None:
        stages.append(StageResult(name, float(accuracy), int(nbytes), time.perf_counter() - start))

    # 1. Dense training.
    start = time.perf_counter()
    result = train.fit(model, tx, data, epochs=epochs, **fit_kwargs)
    graphdef = result.graphdef
    weights["dense"] = _flat_selected(result.state.params, names)
    record("dense", result.history[-1]["test_accuracy"], original_bytes, start)

    # 2. Gradual magnitude pruning, one schedule per kernel, then retraining.
    start = time.perf_counter()
    steps_per_epoch = len(data.x_train) // min(batch_size, len(data.x_train))
    ramp_end = max(1, round(0.6 * prune_epochs) * steps_per_epoch - 1)
    frequency = max(1, steps_per_epoch // 2)
    prunes = [
        pruning.prune(
            pruning.polynomial_schedule(targets[name], 0, ramp_end, frequency=frequency),
            where=lambda n, _, name=name: n == name,
        )
        for name in names
    ]
    pruned_tx = optax.chain(tx, *prunes)
    result = train.fit(
        train.to_model(graphdef, result.state), pruned_tx, data, epochs=prune_epochs, **fit_kwargs
    )
    state = result.state
    weights["pruned"] = _flat_selected(state.params, names)
    sparse_bytes = len(archive.dumps(_archive_tree(state.params, state.rest)))
    record("pruned", result.history[-1]["test_accuracy"], sparse_bytes, start)

    # 3. k-means weight sharing over the kept weights, then centroid fine-tuning.
    start = time.perf_counter()
    codebooks = quantization.kmeans_tree(state.params, {n: widths[n] for n in names}, where=where)
    trainable, rebuild = quantization.centroid_params(state.params, codebooks)
    state = train.TrainState(trainable, state.rest, tx.init(trainable))
    if finetune_epochs:
        result = train.fit_state(
            graphdef,
            state,
            tx,
            data,
            epochs=finetune_epochs,
            param_transform=rebuild,
            **fit_kwargs,
        )
        state = result.state
        shared_accuracy = result.history[-1]["test_accuracy"]
    else:
        shared_accuracy = train.evaluate(
            graphdef, state, data.x_test, data.y_test, param_transform=rebuild
        )["accuracy"]
    codebooks = quantization.update_codebooks(codebooks, state.params)
    params = rebuild(state.params)
    weights["shared"] = _flat_selected(params, names)
    blob = archive.dumps(
        _archive_tree(params, state.rest),
        codebooks={f"params/{n}": book for n, book in codebooks.items()},
        where=lambda n, _: n.removeprefix("params/") in set(names),
        raw_dtype=small_dtype,
        metadata=metadata,
    )
    record("shared", shared_accuracy, len(blob), start)

    # 4. The archive, loaded back: its accuracy is the compressed model's.
    start = time.perf_counter()
    if path is not None:
        archive.write_atomic(path, blob)
    like = train.TrainState(params, state.rest, None)
    # Read back from disk when written, so the file itself is what gets verified.
    stored = archive.loads(blob) if path is None else archive.load(path)
    restored = restore_state(like, stored)
    accuracy = train.evaluate(graphdef, restored, data.x_test, data.y_test)["accuracy"]
    record("archive", accuracy, len(blob), start)
    return CompressionReport(
        stages, archive.inspect(blob), original_bytes, targets, widths, weights
    )


def check_plot_path(path: str | os.PathLike) -> str:
    """The image format for ``path`` (from its suffix, default png), checked before a long run.

    Args:
      path: the image file :func:`plot_report` will write.

    Returns:
      The matplotlib format name, e.g. ``'png'``.

    Raises:
      ImportError: if matplotlib is not installed (``pip install 'jaxopt-nn[plot]'``).
      ValueError: if the suffix is no format matplotlib writes, or the
        directory does not exist.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'jaxopt-nn[plot]'") from err
    check_output_path("plot path", path)
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(
            f"plot path must end in one of {sorted('.' + f for f in formats)}; "
            f"got {os.fspath(path)!r}"
        )
    return suffix


def plot_report(report: CompressionReport, path: str | os.PathLike) -> None:
    """Draw weight histograms per stage and accuracy/size per stage to an image.

    Top row: the selected weights after dense training, after pruning (kept
    weights only) and after weight sharing (kept weights; each bar is a
    centroid). Bottom: test accuracy and model size after every stage. The
    file is written atomically.

    Args:
      report: from :func:`deep_compress`.
      path: image file; the format follows its suffix (``.png``, ``.pdf``, ...).

    Raises:
      ImportError, ValueError: as :func:`check_plot_path`.
    """
    image_format = check_plot_path(path)
    # A bare Figure needs no pyplot backend: nothing global changes for the caller.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 7), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    limit = max((float(np.max(np.abs(w))) for w in report.weights.values() if w.size), default=1.0)
    bins = np.linspace(-limit, limit, 121)
    titles = {
        "dense": "after dense training",
        "pruned": "after pruning (kept weights)",
        "shared": "after weight sharing (kept weights)",
    }
    for column, (stage, title) in enumerate(titles.items()):
        ax = fig.add_subplot(grid[0, column])
        values = report.weights[stage]
        if stage != "dense":
            values = values[values != 0]
        ax.hist(values, bins=bins, color=f"C{column}")
        ax.set_title(f"{title}\n{values.size:,} weights")
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")

    names = [s.name for s in report.stages]
    ax = fig.add_subplot(grid[1, :2])
    ax.plot(names, [100 * s.accuracy for s in report.stages], "o-", color="C3")
    for i, s in enumerate(report.stages):
        ax.annotate(
            f"{s.accuracy:.2%}",
            (i, 100 * s.accuracy),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    ax.margins(x=0.08, y=0.25)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy per stage")
    ax = fig.add_subplot(grid[1, 2])
    kib = [s.nbytes / 1024 for s in report.stages]
    ax.bar(names, kib, color="C4")
    ax.set_yscale("log")
    for i, s in enumerate(report.stages):
        ax.annotate(
            f"{report.original_bytes / s.nbytes:.1f}x",
            (i, kib[i]),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
        )
    ax.set_ylabel("size (KiB, log scale)")
    ax.set_title("model size per stage")
    fig.suptitle(report.summary())
    buffer = io.BytesIO()
    fig.savefig(buffer, format=image_format, dpi=110)
    archive.write_atomic(path, buffer.getvalue())
