import jax
import numpy as np
import optax
import pytest
from flax import nnx

from jaxopt_nn import archive, pipeline, train
from jaxopt_nn.data import load_digits
from jaxopt_nn.models import LeNet300100, ResNet

SHORT = {"epochs": 3, "prune_epochs": 4, "finetune_epochs": 2, "progress": False}


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def compressed(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline") / "model.jnz"
    model = LeNet300100(64, rngs=nnx.Rngs(0))
    report = pipeline.deep_compress(
        model, digits, path=path, metadata={"model": "lenet300"}, **SHORT
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
        ({"bits": 0}, r"bits\['fc1/kernel'\] must be an integer in \[1, 8\]; got 0"),
        ({"sparsity": {"nope/kernel": 0.5}}, "sparsity names layers that are not selected"),
        ({"epochs": 0}, "epochs must be an integer >= 1; got epochs=0"),
        ({"prune_epochs": 1}, "prune_epochs must be an integer >= 2"),
        ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
        ({"where": lambda name, leaf: False}, "where selects no leaf"),
        ({"small_dtype": "int8"}, r"small_dtype must be None, float16, .*; got small_dtype='int8'"),
        ({"path": "/no/such/dir/model.jnz"}, "path must be in an existing directory"),
        ({"metadata": {"f": object()}}, "metadata must be JSON-serialisable"),
    ],
)
def test_bad_arguments_raise_before_training(digits, kwargs, match, monkeypatch):
    def no_training(*args, **kw):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(train, "fit_state", no_training)
    monkeypatch.setattr(train, "fit", no_training)
    with pytest.raises((ValueError, TypeError), match=match):
        pipeline.deep_compress(LeNet300100(64, rngs=nnx.Rngs(0)), digits, progress=False, **kwargs)


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
