import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from jaxopt_nn import archive, pipeline, quantization, train
from jaxopt_nn import tree as tree_lib
from jaxopt_nn.cli import _MAX_BITS as CLI_MAX_BITS
from jaxopt_nn.cli import MODELS
from jaxopt_nn.data import Dataset, load_digits
from jaxopt_nn.models import LeNet300100, ResNet

SHORT = {"epochs": 3, "prune_epochs": 4, "finetune_epochs": 2, "progress": False}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def compressed(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "model.jnz"
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    # A codebook wider than 8 bits (uint16 indices) goes through every stage.
    report = pipeline.deep_compress(
        model, digits, path=path, metadata={"model": "lenet300"}, bits={"fc3/kernel": 10}, **SHORT
    )
    return model, report, path


def test_report_bytes_are_the_files_bytes(compressed):
    _, report, path = compressed
    size = path.stat().st_size
    assert report.info.file_bytes == size
    assert report.stage("archive").nbytes == size
    assert report.info.header_bytes + sum(t.nbytes for t in report.info.tensors) == size
    assert report.original_bytes == 4 * sum(t.size for t in report.info.tensors)
    assert report.compression == pytest.approx(report.original_bytes / size)
    assert archive.inspect(path).metadata == {"model": "lenet300"}
    assert [s.name for s in report.stages] == ["dense", "pruned", "shared", "archive"]


def test_archive_holds_pruned_shared_weights(compressed):
    _, report, path = compressed
    stored = archive.load(path)["params"]
    for layer in ("fc1", "fc2", "fc3"):
        kernel = stored[layer]["kernel"]
        name = f"{layer}/kernel"
        zeros = int(np.sum(kernel == 0))
        assert zeros == round(report.sparsity[name] * kernel.size)
        assert len(np.unique(kernel[kernel != 0])) <= 2 ** report.bits[name]
        assert stored[layer]["bias"].dtype == np.float32  # float16 on disk, float32 loaded
    assert report.bits["fc3/kernel"] == 10
    shared = report.weights["shared"]
    kernels = np.concatenate([stored[f"fc{i}"]["kernel"].ravel() for i in (1, 2, 3)])
    # The biases went through float16; the kernels are exactly the shared weights.
    np.testing.assert_array_equal(kernels, shared)


def test_loaded_archive_gives_the_reported_accuracy(compressed, digits):
    model, report, path = compressed
    graphdef, like = train.init_train_state(model, optax.identity())
    state = pipeline.restore_state(like, archive.load(path))
    accuracy = train.evaluate(graphdef, state, digits.x_test, digits.y_test)["accuracy"]
    assert accuracy == report.stage("archive").accuracy
    assert report.summary().startswith(f"compression {report.compression:.1f}x, accuracy ")


def test_report_tables_and_json(compressed):
    _, report, _ = compressed
    table = report.table()
    assert "params/fc1/kernel" in table and f"{report.info.file_bytes:,}" in table
    stages = report.stage_table()
    assert all(s.name in stages for s in report.stages)
    summary = report.to_dict()
    assert summary["file_bytes"] == report.info.file_bytes
    assert {layer["name"] for layer in summary["layers"]} >= {"params/fc1/kernel"}


def test_plot_report_writes_an_image(compressed, tmp_path):
    _, report, _ = compressed
    out = tmp_path / "report.png"
    pipeline.plot_report(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.5}, r"sparsity\['fc1/kernel'\] must be a number in \[0, 1\); got 1.5"),
        ({"bits": 0}, r"bits\['fc1/kernel'\] must be an integer in \[1, 16\]; got 0"),
        ({"bits": 17}, r"bits\['fc1/kernel'\] must be an integer in \[1, 16\]; got 17"),
        ({"sparsity": {"nope/kernel": 0.5}}, "sparsity names layers that are not selected"),
        ({"epochs": 0}, "epochs must be an integer >= 1; got epochs=0"),
        ({"prune_epochs": 1}, "prune_epochs must be an integer >= 2"),
        ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
        ({"where": lambda name, leaf: False}, "where selects no leaf"),
        ({"small_dtype": "int8"}, r"small_dtype must be None, float16, .*; got small_dtype='int8'"),
        ({"path": "/no/such/dir/model.jnz"}, "path must be in an existing directory"),
        ({"metadata": {"f": object()}}, "metadata must be JSON-serialisable"),
        ({"max_drop": -1.0}, r"max_drop must be a number >= 0 \(points\); got max_drop=-1.0"),
        ({"max_drop": 0.5, "sparsity": 0.9}, "pass max_drop or sparsity/bits, not both"),
        ({"max_drop": 0.5, "validation": 1.5}, r"validation must be a number in \(0, 1\)"),
        ({"distill": 1.5}, r"distill must be a number in \[0, 1\] or None; got distill=1.5"),
        ({"max_drop": 0.5, "folds": 0}, "folds must be an integer >= 1 or None; got folds=0"),
        ({"max_drop": 0.5, "folds": True}, "folds must be an integer >= 1 or None; got folds=True"),
        (
            {"max_drop": 0.5, "folds": 3, "validation": 0.4},
            r"folds=3 is too many for validation=0.4: fold=2 of validation=0.4 .* fold < 2",
        ),
    ],
)
def test_bad_arguments_raise_before_training(digits, kwargs, match, monkeypatch):
    def no_training(*args, **kw):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "fit_state", no_training)
    monkeypatch.setattr(train, "fit", no_training)
    with pytest.raises((ValueError, TypeError), match=match):
        pipeline.deep_compress(LeNet300100(64, rngs=nnx.Rngs(0)), digits, progress=False, **kwargs)


@pytest.mark.parametrize(("distill", "weight"), [(None, 0.0), (0.7, 0.7)])
def test_distill_is_the_loss_of_the_pruning_and_sharing_stages(
    digits, monkeypatch, distill, weight
):
    fits, real_fit, real_fit_state = {}, train.fit, train.fit_state

    def spy(real):
        def fit(*args, stage, loss_fn=None, **kwargs):
            result = real(*args, stage=stage, loss_fn=loss_fn, **kwargs)
            fits[stage] = (loss_fn, result)
            return result

        return fit

    monkeypatch.setattr(train, "fit", spy(real_fit))
    monkeypatch.setattr(train, "fit_state", spy(real_fit_state))
    model = LeNet300100(64, hidden=(16, 8), rngs=nnx.Rngs(0))
    kwargs = {"epochs": 1, "prune_epochs": 2, "finetune_epochs": 1, "progress": False}
    pipeline.deep_compress(model, digits, distill=distill, **kwargs)
    dense_loss, dense = fits["dense"]
    assert dense_loss is None  # the dense model learns from the labels
    teacher = train.to_model(dense.graphdef, dense.state)
    student = LeNet300100(64, hidden=(16, 8), rngs=nnx.Rngs(1))
    x, y = jnp.asarray(digits.x_train[:32]), jnp.asarray(digits.y_train[:32])
    for stage in ("pruning", "sharing"):
        loss_fn, _ = fits[stage]
        if not weight:
            assert loss_fn is None
            continue
        expected = pipeline.structured.distillation_loss_fn(teacher, weight=weight)
        np.testing.assert_allclose(loss_fn(student, x, y)[0], expected(student, x, y)[0], rtol=1e-6)


def test_restore_state_refuses_an_archive_without_the_models_batch_statistics():
    model = ResNet(8, 10, rngs=nnx.Rngs(0))
    _, like = train.init_train_state(model, optax.identity())
    assert jax.tree.leaves(like.rest)
    with pytest.raises(ValueError, match="no batch statistics"):
        pipeline.restore_state(like, {"params": nnx.to_pure_dict(like.params)})


def test_check_plot_path_refuses_unknown_formats_and_missing_directories(tmp_path):
    assert pipeline.check_plot_path(tmp_path / "r.PDF") == "pdf"
    assert pipeline.check_plot_path(tmp_path / "report") == "png"
    with pytest.raises(ValueError, match=r"plot path must end in one of .*'.png'"):
        pipeline.check_plot_path(tmp_path / "r.xyz")
    with pytest.raises(ValueError, match="plot path must be in an existing directory"):
        pipeline.check_plot_path(tmp_path / "missing" / "r.png")


class _DropoutNet(nnx.Module):
    """A user model with dropout: its nnx.Rngs key and count are RNG state, not weights."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.fc2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.drop(nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))))


def test_dropout_models_compress_without_storing_rng_state_and_name_each_stage(
    digits, capsys, tmp_path
):
    path = tmp_path / "dropout.jnz"
    report = pipeline.deep_compress(
        _DropoutNet(nnx.Rngs(0)), digits, epochs=1, prune_epochs=2, finetune_epochs=1, path=path
    )
    err = capsys.readouterr().err
    assert all(stage in err for stage in ("dense", "pruning", "sharing")), err
    assert "training" not in err
    names = [t.name for t in report.info.tensors]
    assert not any("rngs" in name for name in names), names
    assert report.original_bytes == 4 * (64 * 16 + 16 + 16 * 10 + 10)
    # The archive loads into a fresh model, whose own RNG state is kept.
    graphdef, like = train.init_train_state(_DropoutNet(nnx.Rngs(1)), optax.identity())
    key = jax.random.key_data(like.rest["drop"]["rngs"]["key"][...])
    state = pipeline.restore_state(like, archive.load(path))
    np.testing.assert_array_equal(jax.random.key_data(state.rest["drop"]["rngs"]["key"][...]), key)
    accuracy = train.evaluate(graphdef, state, digits.x_test, digits.y_test)["accuracy"]
    assert accuracy == report.stage("archive").accuracy


class _ComplexStat(nnx.Variable):
    pass


def test_a_leaf_the_archive_cannot_store_fails_before_training(digits, monkeypatch):
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    model.phase = _ComplexStat(jnp.zeros(3, jnp.complex64))

    def no_training(*args, **kw):
        raise AssertionError("training started before the leaves were checked")

    monkeypatch.setattr(train, "fit", no_training)
    with pytest.raises(TypeError, match="complex64"):
        pipeline.deep_compress(model, digits, progress=False)


class _UserNet(nnx.Module):
    """Names that sort against the computation: the logits come from 'fc10', not 'head'."""

    def __init__(self, rngs):
        self.fc2 = nnx.Linear(64, 16, rngs=rngs)
        self.head = nnx.Linear(16, 16, rngs=rngs)
        self.fc10 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc10(jax.nn.gelu(self.head(nnx.relu(self.fc2(x)))))


_OUTPUT_LAYER = {
    "lenet300": "fc3/kernel",
    "lenet5": "fc2/kernel",
    "cnn": "fc2/kernel",
    "resnet20": "fc/kernel",
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_sparsity_finds_the_output_layer_of_every_built_in_model(name):
    assert set(_OUTPUT_LAYER) == set(MODELS)
    model = nnx.eval_shape(lambda: MODELS[name]((8, 8, 1), 10, nnx.Rngs(0)))  # shapes only
    targets = pipeline.default_sparsity(
        model, inputs=jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32)
    )
    params = dict(pipeline.tree_lib.leaves_with_names(nnx.state(model, nnx.Param)))
    for layer, target in targets.items():
        if layer == _OUTPUT_LAYER[name]:
            assert target == 0.85
        else:
            assert target == (0.7 if params[layer].ndim > 2 else 0.95), layer


def test_default_sparsity_follows_the_computation_not_the_names():
    model = _UserNet(nnx.Rngs(0))
    x = jnp.zeros((2, 64))
    expected = {"fc10/kernel": 0.85, "fc2/kernel": 0.95, "head/kernel": 0.95}
    assert pipeline.default_sparsity(model, inputs=x) == expected
    # The same from a parameter pytree and a function applying it.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)

    def apply_fn(p, inputs):
        state = jax.tree.map(lambda leaf: leaf, params)
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state, rest)(inputs)

    assert pipeline.default_sparsity(pure, apply_fn=apply_fn, inputs=x) == expected
    assert pipeline.output_layers(pure, apply_fn, x) == ["fc10/kernel"]
    # An auxiliary head is not the output layer of the main logits.
    resnet = nnx.eval_shape(lambda: ResNet(8, 10, aux_heads=True, rngs=nnx.Rngs(0)))
    x8 = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    assert pipeline._nnx_output_layers(resnet, x8) == ["fc/kernel"]
    # Without a computation, numbered names compare as numbers (fc2 < fc10).
    guess = pipeline.default_sparsity({"fc2": jnp.zeros((4, 4)), "fc10": jnp.zeros((4, 2))})
    assert guess == {"fc10": 0.85, "fc2": 0.95}
    with pytest.raises(ValueError, match="inputs .* is required when params is an NNX model"):
        pipeline.default_sparsity(model)


def test_one_bit_width_limit_across_kmeans_archive_pipeline_and_cli():
    from jaxopt_nn.cli import _bits

    assert pipeline.MAX_BITS == CLI_MAX_BITS == 16
    assert _bits(str(pipeline.MAX_BITS)) == pipeline.MAX_BITS
    w = jnp.linspace(-1.0, 1.0, 64).reshape(8, 8)
    book = quantization.kmeans_codebook(w, pipeline.MAX_BITS)
    assert book.indices.dtype == jnp.uint16
    np.testing.assert_array_equal(
        archive.loads(archive.dumps({"w": w}, codebooks={"w": book}))["w"],
        quantization.codebook_weights(book),
    )
    with pytest.raises(ValueError, match=r"bits must lie in \[1, 16\]"):
        quantization.kmeans_codebook(w, pipeline.MAX_BITS + 1)


def _untrained_report(make_model):
    """A report of random weights of a model's shapes, 90% of each kernel zero (no training)."""
    _, params, rest = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
    rng = np.random.default_rng(0)
    tree = jax.tree.map(
        lambda s: rng.normal(size=s.shape).astype(s.dtype), pipeline._archive_tree(params, rest)
    )
    tree = pipeline.tree_lib.map_selected(
        lambda w: np.where(np.arange(w.size).reshape(w.shape) % 10 == 0, w, 0), tree
    )
    blob = archive.dumps(tree, raw_dtype="float16")
    original = 4 * pipeline.tree_lib.count_params(tree)
    return pipeline.CompressionReport([], archive.inspect(blob), original, {}, {}, {})


def _bytes_column(line):
    """The bytes cell of a table row: its last plain integer (compression ends in 'x')."""
    return int(
        [cell for cell in line.split() if cell.replace(",", "").isdigit()][-1].replace(",", "")
    )


def test_table_groups_raw_leaves_and_its_bytes_sum_to_the_file():
    report = _untrained_report(lambda: ResNet(20, 10, in_channels=1, rngs=nnx.Rngs(0)))
    full = report.table(verbose=True)
    assert len(full.splitlines()) == len(report.info.tensors) + 3
    table = report.table()
    lines = table.splitlines()
    coded = [t for t in report.info.tensors if t.method != "raw"]
    assert len(lines) == len(coded) + 4  # headers, coded rows, 'other', header bytes, total
    raw = len(report.info.tensors) - len(coded)
    assert any(line.startswith(f"other ({raw} raw leaves)") for line in lines), table
    assert "bn1/scale" not in table and "bn1/scale" in full
    for text in (table, full):
        rows = text.splitlines()[1:-1]
        assert sum(map(_bytes_column, rows)) == _bytes_column(text.splitlines()[-1])
        assert _bytes_column(text.splitlines()[-1]) == report.info.file_bytes
    # Few modules: one row per module, and a single leaf keeps its name.
    small = _untrained_report(lambda: LeNet300100(64, rngs=nnx.Rngs(0))).table()
    assert "params/fc1/bias" in small and "other" not in small


@pytest.fixture
def compile_cache(tmp_path):
    """A fresh persistent compilation cache for one test: a second identical run of the
    pipeline reuses the first run's executables (the same code, so the same numbers)."""
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {key: getattr(jax.config, key) for key in keys}
    for key, value in zip(keys, (str(tmp_path / "xla"), 0.0, 0), strict=True):
        jax.config.update(key, value)
    compilation_cache.reset_cache()
    yield
    for key, value in saved.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()


def test_budget_search_is_identical_when_the_test_split_is_garbage(
    digits, monkeypatch, compile_cache, tmp_path
):
    # One candidate per source keeps the test short (compilation dominates its
    # time); the search's code paths are the same as with the full grids.
    monkeypatch.setattr(pipeline.allocation, "SPARSITIES", (0.9,))
    monkeypatch.setattr(pipeline.allocation, "BITS", (4,))
    monkeypatch.setattr(pipeline.allocation, "SCALES", (0.5,))
    monkeypatch.setattr(pipeline.allocation, "CAPS", (4,))
    monkeypatch.setattr(pipeline, "SLIM_EPOCHS", 1)
    monkeypatch.setattr(pipeline, "SLIM_FRACTIONS", (0.5,))  # both widths: test_slim_sources_...
    kwargs = {"epochs": 1, "prune_epochs": 2, "finetune_epochs": 0, "progress": False}

    model = LeNet300100(64, hidden=(100, 16), rngs=nnx.Rngs(0))  # deep_compress copies it

    def run(data):
        return pipeline.deep_compress(
            model, data, max_drop=0.5, path=tmp_path / "model.jnz", **kwargs
        )

    report = run(digits)
    rng = np.random.default_rng(0)
    garbage = digits._replace(
        x_test=rng.normal(size=digits.x_test.shape).astype(np.float32),
        y_test=rng.integers(0, 10, digits.y_test.shape).astype(digits.y_test.dtype),
    )
    other = run(garbage)
    assert report.search == other.search
    assert report.info.file_bytes == other.info.file_bytes
    assert report.stage("dense").accuracy != other.stage("dense").accuracy  # test: reported only
    search = report.search
    assert search["probes"] and search["folds"] == pipeline.BUDGET_FOLDS  # the budget's default
    assert search["validation_examples"] == 136 * pipeline.BUDGET_FOLDS
    assert search["distill"] == pipeline.BUDGET_DISTILL  # the budget's default
    # Candidates come from the dense model and from its slimmed copy (half the channels).
    assert search["slim_fractions"] == [0.0, *pipeline.SLIM_FRACTIONS]
    kernel = dict(tree_lib.leaves_with_names(archive.load(tmp_path / "model.jnz")))
    width = kernel["params/fc1/kernel"].shape[1]
    assert width == (100 if search["slim"] == 0 else 100 * (1 - search["slim"]))
    # A slim archive says so, for the readers that rebuild the model from its shapes.
    metadata = archive.inspect(tmp_path / "model.jnz").metadata or {}
    assert metadata.get("structured", False) == bool(search["slim"])
    for probe in search["probes"]:  # a probe stopped after the first fold cannot pass
        drop = 100 * (search["dense_validation_accuracy"] - probe["validation_accuracy"])
        complete = len(probe["fold_accuracies"]) == search["folds"]
        assert probe["passed"] == (complete and drop <= 0.5 + 1e-9)
    chosen = next(p for p in search["probes"] if p["candidate"] == search["chosen"])
    assert report.sparsity == chosen["sparsity"] and report.bits == chosen["bits"]
    assert report.info.file_bytes == chosen["bytes"]
    if search["budget_met"]:  # the smallest passing probe was chosen
        passing = [p["bytes"] for p in search["probes"] if p["passed"]]
        assert chosen["bytes"] == min(passing)
    # Kernels are shared, and biases where a codebook is estimated smaller than
    # float16: the 100-value bias is, the 16- and 10-value ones stay raw.
    shared = {t.name for t in report.info.tensors if t.method == "codebook"}
    assert shared == {f"params/{n}" for n in report.bits}
    assert "params/fc1/bias" in shared and "params/fc2/bias" not in shared
    # Centroids are stored in float16 (the archive is what the budget verifies).
    stored = dict(tree_lib.leaves_with_names(archive.load(tmp_path / "model.jnz")))
    for name in shared:
        np.testing.assert_array_equal(stored[name], stored[name].astype(np.float16))
    assert "budget: validation accuracy" in report.search_summary()


def test_cross_validated_budget_pools_the_validation_images_of_every_fold(digits, monkeypatch):
    monkeypatch.setattr(pipeline.allocation, "SPARSITIES", (0.9,))
    monkeypatch.setattr(pipeline.allocation, "BITS", (4,))
    monkeypatch.setattr(pipeline.allocation, "SCALES", (0.5,))
    monkeypatch.setattr(pipeline.allocation, "CAPS", (4,))
    monkeypatch.setattr(pipeline, "SLIM_EPOCHS", 1)
    monkeypatch.setattr(pipeline, "SLIM_FRACTIONS", (0.5,))
    fits, pruned, real_fit, real_prune = {}, [], train.fit, pipeline._prune_and_share

    def fit(model, tx, data, *, stage, **kwargs):
        fits[stage] = data
        return real_fit(model, tx, data, stage=stage, **kwargs)

    def prune_and_share(graphdef, dense, data, *args, **kwargs):
        pruned.append((data, kwargs.get("loss_fn")))
        return real_prune(graphdef, dense, data, *args, **kwargs)

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.setattr(pipeline, "_prune_and_share", prune_and_share)
    model = LeNet300100(64, hidden=(100, 16), rngs=nnx.Rngs(0))
    kwargs = {"epochs": 1, "prune_epochs": 2, "finetune_epochs": 0, "progress": False}
    report = pipeline.deep_compress(model, digits, max_drop=0.5, folds=2, **kwargs)
    search = report.search
    folds = [pipeline.allocation.split_validation(digits, 0.1, fold=k) for k in range(2)]
    # Each fold's dense model trains on the rest of the training data, not on its own split.
    for stage, fold in zip(("dense", "dense 1"), folds, strict=True):
        np.testing.assert_array_equal(fits[stage].x_train, fold.x_train)
        np.testing.assert_array_equal(fits[stage].y_test, fold.y_test)
    # Probes alternate folds: the first fold, then the second unless it cannot pass any more.
    fold_of = [0 if np.array_equal(d.y_test, folds[0].y_test) else 1 for d, _ in pruned]
    expected = [k for p in search["probes"] for k in range(len(p["fold_accuracies"]))]
    assert fold_of == expected
    losses = [loss for _, loss in pruned]  # each fold distils its own dense model
    assert all(loss is not None for loss in losses)
    assert {id(loss) for loss, k in zip(losses, fold_of, strict=True) if k == 1}.isdisjoint(
        {id(loss) for loss, k in zip(losses, fold_of, strict=True) if k == 0}
    )
    n = [len(fold.y_test) for fold in folds]
    assert search["folds"] == 2 and search["validation_examples"] == sum(n) == 272
    dense_right = sum(round(a * m) for a, m in zip(search["dense_fold_accuracies"], n, strict=True))
    assert search["dense_validation_accuracy"] == dense_right / sum(n)
    for probe in search["probes"]:
        right = [round(a * m) for a, m in zip(probe["fold_accuracies"], n, strict=False)]
        lost = dense_right - sum(right)
        if len(right) == 2:  # the budget on the pooled count: 0.5 point of 272 is one image
            assert probe["passed"] == (lost <= 1)
        else:  # stopped: more than one image lost even if the second fold scored 100%
            assert not probe["passed"] and lost - n[1] > 1
    chosen = next(p for p in search["probes"] if p["candidate"] == search["chosen"])
    assert report.info.file_bytes == chosen["bytes"]
    assert "on 272 held-out training examples (2 folds)" in report.search_summary()


def test_slim_sources_halve_and_quarter_an_nnx_model_and_skip_a_linen_one(monkeypatch):
    import flax.linen as nn

    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))

    monkeypatch.setattr(pipeline, "SLIM_EPOCHS", 1)
    rng = np.random.default_rng(0)
    data = Dataset(
        rng.normal(size=(32, 5)).astype(np.float32),
        rng.integers(0, 3, 32),
        rng.normal(size=(8, 5)).astype(np.float32),
        rng.integers(0, 3, 8),
        3,
    )
    fit_kwargs = {"batch_size": 16, "seed": 0, "progress": False}
    model = LeNet300100(5, 3, hidden=(16, 8), rngs=nnx.Rngs(0))
    graphdef, state = train.init_train_state(model, optax.identity())
    half, quarter = pipeline._slim_sources(graphdef, state, data, 1e-3, fit_kwargs)
    assert (half.slim, quarter.slim) == pipeline.SLIM_FRACTIONS == (0.5, 0.75)
    for source, widths in ((half, (8, 4)), (quarter, (4, 2))):
        shapes = {n: np.shape(v) for n, v in tree_lib.leaves_with_names(source.state.params)}
        assert shapes["fc1/kernel"] == (5, widths[0])
        assert shapes["fc2/kernel"] == (widths[0], widths[1])
    # Linen layers behind the bridge cannot be resized: no slim source, no error.
    linen = nnx.bridge.ToNNX(LinenMLP(), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(linen, jnp.zeros((1, 5)))
    graphdef, state = train.init_train_state(linen, optax.identity())
    assert pipeline._slim_sources(graphdef, state, data, 1e-3, fit_kwargs) == []
