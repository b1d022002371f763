"""Tests for the jaxopt-nn command: help, a short training run, bad arguments."""

import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_nn.cli import MODELS, main


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
