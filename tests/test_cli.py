"""Tests for the jaxopt-nn command: help, a short training run, bad arguments."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_nn import archive
from jaxopt_nn.cli import MODELS, main
from jaxopt_nn.data import load_digits


def _table_value(out, label):
    match = re.search(rf"{label}\s*│\s*([0-9.,]+)%?", out)
    assert match, out
    return float(match.group(1).replace(",", ""))


def test_help_lists_the_subcommands_and_options(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--data", "--epochs", "--batch-size", "--lr", "--seed", "--quiet"):
        assert option in out
    for name in MODELS:
        assert name in out


def test_short_train_run_prints_a_results_table(capsys):
    assert main(["train", "--epochs", "3", "--quiet", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress bar
    assert "lenet300 on digits" in captured.out
    assert _table_value(captured.out, "parameters") == 64 * 300 + 300 + 300 * 100 + 100 + 1010
    assert _table_value(captured.out, "epochs") == 3
    assert 50.0 <= _table_value(captured.out, "test accuracy") <= 100.0


def test_train_reads_an_npz_path_and_shows_progress(tmp_path, capsys):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (40, 5, 5), dtype=np.uint8),
        y_train=rng.integers(0, 4, 40),
        x_test=rng.integers(0, 256, (9, 5, 5), dtype=np.uint8),
        y_test=rng.integers(0, 4, 9),
    )
    assert main(["train", "--data", str(path), "--epochs", "2", "--batch-size", "16"]) == 0
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.err
    assert _table_value(captured.out, "train examples") == 40
    assert (
        _table_value(captured.out, "parameters") == 25 * 300 + 300 + 300 * 100 + 100 + 100 * 4 + 4
    )


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("in_shape", [(8, 8, 1), (28, 28, 1), (5, 7, 3)])
def test_every_cli_model_accepts_the_dataset_shape(name, in_shape):
    out = nnx.eval_shape(lambda: MODELS[name](in_shape, 7, nnx.Rngs(0))(jnp.zeros((2, *in_shape))))
    assert out.shape == (2, 7)


@pytest.mark.parametrize(
    "argv, status, message",
    [
        (["train", "--epochs", "0"], 2, "argument --epochs: must be a positive integer; got '0'"),
        (
            ["train", "--epochs", "ten"],
            2,
            "argument --epochs: must be a positive integer; got 'ten'",
        ),
        (["train", "--batch-size", "-3"], 2, "argument --batch-size: must be a positive integer"),
        (["train", "--lr", "-0.1"], 2, "argument --lr: must be a positive number; got '-0.1'"),
        (["train", "--lr", "nan"], 2, "argument --lr: must be a positive number; got 'nan'"),
        (["train", "--seed", "-1"], 2, "argument --seed: must be a non-negative integer"),
        (["train", "--model", "vgg"], 2, "argument --model: invalid choice: 'vgg'"),
        (["train", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["fly"], 2, "invalid choice: 'fly'"),
        ([], 2, "the following arguments are required: COMMAND"),
        (["train", "--data", "no/such/dir"], 1, "data 'no/such/dir' not found"),
    ],
)
def test_bad_arguments_give_one_error_line_and_a_nonzero_status(argv, status, message, capsys):
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("jaxopt-nn") and "error: " in err and message in err


def test_a_corrupt_data_file_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["train", "--data", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"jaxopt-nn train: error: {path}: not a valid or complete .npz archive" in err


def test_the_module_runs_as_a_script_without_a_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxopt_nn.cli", "train", "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "jaxopt-nn train: error: argument --epochs: must be a positive integer; got '0'\n"
    )
    assert proc.stdout == ""


def _write_idx(path, array):
    """An MNIST-format IDX file (big-endian header, uint8 data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


_SHORT_COMPRESS = ["--epochs", "2", "--prune-epochs", "3", "--finetune-epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory):
    """One short `compress` run on digits: (archive path, json path, stdout)."""
    import contextlib
    import io

    out_dir = tmp_path_factory.mktemp("compress")
    archive_path, json_path = out_dir / "m.jnz", out_dir / "r.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            ["compress", *_SHORT_COMPRESS, "--out", str(archive_path), "--json", str(json_path)]
        )
    assert code == 0
    return archive_path, json_path, stdout.getvalue()


def test_compress_reports_the_files_bytes_and_ends_with_the_summary(compressed_run):
    import json

    archive_path, json_path, out = compressed_run
    lines = out.strip().splitlines()
    match = re.fullmatch(r"compression ([0-9.]+)x, accuracy ([0-9.]+)% -> ([0-9.]+)%", lines[-1])
    assert match, lines[-1]
    report = json.loads(json_path.read_text())
    size = archive_path.stat().st_size
    assert report["file_bytes"] == size
    assert f"({size:,} bytes)" in out
    assert float(match.group(1)) == pytest.approx(report["original_bytes"] / size, abs=0.05)
    assert report["metadata"] == {"model": "lenet300", "in_shape": [8, 8, 1], "num_classes": 10}
    assert "params/fc1/kernel" in out and "header" in out


def test_evaluate_matches_the_reported_accuracy(compressed_run, capsys):
    import json

    archive_path, json_path, _ = compressed_run
    final = json.loads(json_path.read_text())["stages"][-1]
    assert final["name"] == "archive"
    assert main(["evaluate", str(archive_path)]) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([0-9.]+)%", out).group(1))
    assert accuracy == pytest.approx(100 * final["accuracy"], abs=0.005)


def test_inspect_prints_the_per_tensor_table(compressed_run, capsys):
    archive_path, _, _ = compressed_run
    assert main(["inspect", str(archive_path)]) == 0
    out = capsys.readouterr().out
    assert "fc2/kernel" in out and "codebook" in out
    assert f"{archive_path.stat().st_size:,}" in out
    assert "metadata: model=lenet300" in out


def test_compress_runs_on_mnist_format_idx_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("t10k", 16)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)
    out = tmp_path / "mnist.jnz"
    argv = ["compress", "--data", str(tmp_path), "--out", str(out), *_SHORT_COMPRESS]
    assert main([*argv, "--batch-size", "32"]) == 0
    assert "compression " in capsys.readouterr().out.splitlines()[-1]
    assert main(["evaluate", str(out), "--data", str(tmp_path)]) == 0
    assert "16 examples" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "--model", "vgg"], "invalid choice: 'vgg'"),
        (["compress", "--sparsity", "1.5"], "must be a number in [0, 1); got '1.5'"),
        (["compress", "--bits", "0"], "must be an integer in [1, 16]; got '0'"),
        (["compress", "--sparsity", "fc1/kernel"], "must be a number in [0, 1)"),
        (["compress", "--data", "/no/such/dir"], "'/no/such/dir' not found"),
        (["compress", "--sparsity", "fc9/kernel=0.5"], "sparsity names layers that are not"),
        (["evaluate", "/no/such.jnz"], "No such file"),
        (["compress", "--prune-epochs", "1"], "argument --prune-epochs: must be an integer >= 2"),
        (["compress", "--out", "/no/such/dir/m.jnz"], "--out must be in an existing directory"),
        (["compress", "--json", "/no/such/dir/r.json"], "--json must be in an existing directory"),
        (["compress", "--plot", "report.xyz"], "plot path must end in one of"),
        (["compress", "--max-drop", "-1"], "argument --max-drop: must be a number >= 0"),
        (["compress", "--validation", "1"], "argument --validation: must be a number in (0, 1)"),
        (["compress", "--max-drop", "0.5", "--bits", "4"], "pass max_drop or sparsity/bits"),
        (["compress", "--distill", "2"], "argument --distill: must be a number in [0, 1]"),
        (["compress", "--folds", "0"], "argument --folds: must be a positive integer; got '0'"),
        (
            ["compress", "--max-drop", "0.5", "--folds", "3", "--validation", "0.4"],
            "folds=3 is too many for validation=0.4",
        ),
    ],
)
def test_compress_and_evaluate_bad_arguments_give_one_error_line(argv, message, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_layer_options_accept_names_with_or_without_the_params_prefix():
    from jaxopt_nn.cli import _per_layer, _sparsity

    parse = _per_layer(_sparsity)
    assert parse("params/fc1/kernel=0.9, fc2/kernel=0.5") == {"fc1/kernel": 0.9, "fc2/kernel": 0.5}
    assert parse("0.8") == 0.8


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"model": ["x"]}, "records model ['x']"),
        ({"model": "lenet300", "num_classes": "ten"}, "records num_classes='ten'"),
    ],
)
def test_evaluate_refuses_forged_metadata_in_one_line(tmp_path, metadata, message, capsys):
    path = tmp_path / "forged.jnz"
    archive.save(path, {"params": {"w": np.ones((2, 2), np.float32)}}, metadata=metadata)
    assert main(["evaluate", str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_evaluate_builds_the_model_for_the_archives_classes(compressed_run, tmp_path, capsys):
    # Evaluation data whose labels stop below the top class still gets the 10-way model.
    digits = load_digits()
    keep = digits.y_test < 9
    path = tmp_path / "eight.npz"
    np.savez(
        path,
        x_train=digits.x_train,
        y_train=np.minimum(digits.y_train, 8),
        x_test=digits.x_test[keep],
        y_test=digits.y_test[keep],
    )
    archive_path, _, _ = compressed_run
    assert main(["evaluate", str(archive_path), "--data", str(path)]) == 0
    assert f"{int(keep.sum()):,} examples" in capsys.readouterr().out


def test_evaluate_refuses_a_corrupt_archive(compressed_run, tmp_path, capsys):
    archive_path, _, _ = compressed_run
    data = bytearray(archive_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.jnz"
    bad.write_bytes(bytes(data))
    assert main(["evaluate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "jaxopt-nn evaluate: error:" in err and "CRC32" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("verbose", [False, True])
def test_compress_groups_raw_leaves_of_resnet20_unless_verbose(
    verbose, tmp_path, monkeypatch, capsys
):
    from flax import nnx

    from jaxopt_nn import cli, pipeline

    def make_model(name, in_shape, num_classes, seed):  # shapes only: no minutes of init
        return nnx.eval_shape(lambda: MODELS[name](tuple(in_shape), num_classes, nnx.Rngs(seed)))

    def deep_compress(model, data, **kwargs):
        _, params, rest = nnx.split(model, nnx.Param, ...)
        rng = np.random.default_rng(0)
        tree = jax.tree.map(
            lambda s: rng.normal(size=s.shape).astype(s.dtype) * (rng.random(s.shape) < 0.1),
            pipeline._archive_tree(params, rest),
        )
        blob = archive.dumps(tree, raw_dtype="float16")
        archive.write_atomic(kwargs["path"], blob)
        stages = [pipeline.StageResult(n, 0.5, len(blob), 0.0) for n in ("dense", "archive")]
        return pipeline.CompressionReport(stages, archive.inspect(blob), 4, {}, {}, {})

    monkeypatch.setattr(cli, "_make_model", make_model)
    monkeypatch.setattr(pipeline, "deep_compress", deep_compress)
    out = tmp_path / "r.jnz"
    argv = ["compress", "--model", "resnet20", "--out", str(out), "--quiet"]
    assert main(argv + ["--verbose"] * verbose) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    info = archive.inspect(out)
    raw = [t for t in info.tensors if t.method == "raw"]
    assert len(raw) > 40
    if verbose:
        assert len(table) == len(info.tensors) + 3
    else:
        assert len(table) == len(info.tensors) - len(raw) + 4
        assert any(line.startswith(f"other ({len(raw)} raw leaves)") for line in table)
    cells = [[c for c in line.split() if c.replace(",", "").isdigit()] for line in table[1:-1]]
    assert sum(int(c[-1].replace(",", "")) for c in cells) == out.stat().st_size
