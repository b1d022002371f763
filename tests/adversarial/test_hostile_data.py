"""Crafted IDX and NPZ files are refused, naming the file, within bounds.

Read in forked children of the warm worker (``worker.py``) by the data
loaders and by ``jaxopt-nn train --data``; bounds as in ``bounds.py``.
"""

import gzip

import numpy as np
import pytest

from jaxopt_nn import data

from . import crafted
from .bounds import assert_cheap, assert_refused

IMAGES = "train-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def gzip_bomb():
    """1 MiB of gzip: 10 declared 28x28 images, then zeros up to 1 GiB."""
    blob = crafted.gzip_bomb(crafted.idx_header(0x08, (10, 28, 28)), 1 << 30)
    assert len(blob) < 1_100_000
    return blob


def write_idx_dir(directory, images: bytes):
    """A directory of the four MNIST files, the training images replaced by ``images``."""
    directory.mkdir()
    (directory / IMAGES).write_bytes(images)
    labels = crafted.idx_header(0x08, (10,)) + bytes(10)
    (directory / "train-labels-idx1-ubyte").write_bytes(labels)
    (directory / "t10k-images-idx3-ubyte").write_bytes(
        crafted.idx_header(0x08, (10, 28, 28)) + bytes(7840)
    )
    (directory / "t10k-labels-idx1-ubyte").write_bytes(labels)
    return directory


def test_idx_gzip_bomb_is_stopped_after_the_declared_size(bounded, gzip_bomb, tmp_path):
    path = tmp_path / IMAGES
    path.write_bytes(gzip_bomb)
    reply = bounded.run("read_idx", path)
    assert_refused(
        reply, r"trailing bytes after the data of shape \(10, 28, 28\)", archive_error=False
    )
    assert str(path) in reply["message"]


def test_idx_gzip_bomb_through_the_cli_is_one_line(bounded, gzip_bomb, tmp_path):
    directory = write_idx_dir(tmp_path / "mnist", gzip_bomb)
    reply = bounded.run("cli", directory, "train", "--data", "{path}", "--epochs", "1")
    assert_cheap(reply)
    assert reply["result"]["rc"] == 1
    lines = reply["result"]["stderr"].splitlines()
    assert len(lines) == 1 and "trailing bytes after the data" in lines[0], lines
    assert IMAGES in lines[0]


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2**16, 2**16, 2**16), r"declares 281,474,976,710,656 bytes, more than max_bytes"),
        ((60000, 28, 28), r"truncated data: shape \(60000, 28, 28\) needs 47040000 bytes"),
    ],
)
def test_idx_header_is_checked_before_the_data_is_read(bounded, tmp_path, shape, match):
    for name, blob in [
        ("x-idx3-ubyte", crafted.idx_header(0x08, shape) + bytes(100)),
        ("x-idx3-ubyte.gz", crafted.gzip_bomb(crafted.idx_header(0x08, shape), 1 << 24)),
    ]:
        path = tmp_path / name
        path.write_bytes(blob)
        reply = bounded.run("read_idx", path)
        if "truncated" in match and name.endswith(".gz"):
            match = r"truncated data: shape \(60000, 28, 28\) needs 47040000 bytes, found 16777200"
        assert_refused(reply, match, archive_error=False)
        assert str(path) in reply["message"]


def test_idx_max_bytes_bounds_the_files_together(tmp_path):
    directory = write_idx_dir(
        tmp_path / "mnist", gzip.compress(crafted.idx_header(0x08, (10, 28, 28)) + bytes(7840))
    )
    assert data.load_idx(directory).x_train.shape == (10, 28, 28, 1)
    with pytest.raises(ValueError, match=r"t10k-labels.*\(15,700 with the arrays before it\)"):
        data.load_idx(directory, max_bytes=7840 + 10 + 7840)  # the test labels do not fit
    with pytest.raises(ValueError, match="max_bytes must be None or a non-negative integer"):
        data.load_idx(directory, max_bytes=1.5)


NPZ_CASES = {
    "2**40 float32 elements in 1 KB": (
        {"x_train": crafted.npy_header((2**40,))},
        r"\[x_train\]: shape \(1099511627776,\) declares 4,398,046,511,104 bytes, more than",
    ),
    "member shorter than its header declares": (
        {"x_train": crafted.npy_header((6, 4, 4), "|u1") + bytes(10)},
        r"\[x_train\]: the member holds 138 bytes; its header of 128 bytes declares shape",
    ),
    "object dtype": (
        {"y_test": crafted.npy_header((3,), "|O")},
        r"\[y_test\]: dtype object holds Python objects",
    ),
    "missing member": (
        {"x_test": None},
        r"missing arrays \['y_train', 'x_test', 'y_test'\]; found \['x_train'\]",
    ),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_hostile_npz_is_refused_before_loading(bounded, tmp_path, case):
    override, match = NPZ_CASES[case]
    members = {k: v for k, v in override.items() if v is not None}
    blob = crafted.toy_npz(**members)
    if None in override.values():
        blob = crafted.npz({"x_train": crafted.npy(np.zeros((1, 2, 2), np.uint8))})
    path = tmp_path / "data.npz"
    path.write_bytes(blob)
    reply = bounded.run("load_data", path)
    assert_refused(reply, match, archive_error=False)
    assert str(path) in reply["message"]
    reply = bounded.run("cli", path, "train", "--data", "{path}", "--epochs", "1")
    assert_cheap(reply)
    assert reply["result"]["rc"] == 1
    lines = reply["result"]["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxopt-nn train: error: "), lines


def test_a_valid_crafted_npz_loads(tmp_path):
    path = tmp_path / "ok.npz"
    path.write_bytes(crafted.toy_npz())
    dataset = data.load_npz(path)
    assert dataset.x_train.shape == (6, 4, 4, 1) and dataset.num_classes == 3
    with pytest.raises(ValueError, match=r"48 bytes \(144 with the arrays before it\), more than"):
        data.load_npz(path, max_bytes=100)
