"""Tests for jaxopt_nn.data: digits, the batch iterator, IDX and NPZ loaders."""

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_nn.data import Dataset, batches, load, load_digits, load_idx, load_npz, read_idx

# ---------------------------------------------------------------- digits


def test_load_digits_is_normalised_nhwc_and_stratified():
    data = load_digits()
    assert isinstance(data, Dataset)
    assert data.x_train.shape[1:] == data.x_test.shape[1:] == (8, 8, 1)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == pytest.approx(0.25 * 1797, abs=1)
    assert data.x_train.dtype == data.x_test.dtype == np.float32
    assert data.y_train.dtype == data.y_test.dtype == np.int32
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    all_counts = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    test_counts = np.bincount(data.y_test, minlength=10)
    # Stratified: every class keeps its share of the test set to within one example.
    np.testing.assert_allclose(test_counts, all_counts * len(data.y_test) / 1797, atol=1.0)


def test_load_digits_split_depends_only_on_the_seed():
    a, b, c = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_test, c.y_test)
    assert len(load_digits(test_fraction=0.5).y_test) == pytest.approx(1797 / 2, abs=1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_load_digits_rejects_a_bad_test_fraction(fraction):
    with pytest.raises(
        ValueError, match=rf"test_fraction must lie in \(0, 1\); got test_fraction={fraction}"
    ):
        load_digits(test_fraction=fraction)


# ---------------------------------------------------------------- batches


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 50),
    batch_size=st.integers(1, 20),
    seed=st.integers(0, 2**31),
    drop=st.booleans(),
)
def test_batches_cover_a_permutation_in_order_of_sizes(n, batch_size, seed, drop):
    x = np.arange(n, dtype=np.float32)[:, None] * 10.0
    y = np.arange(n)
    got = list(batches(x, y, batch_size, seed=seed, drop_remainder=drop))
    sizes = [len(b) for _, b in got]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop else [])
    labels = np.concatenate([b for _, b in got]) if got else np.zeros(0, int)
    assert len(set(labels.tolist())) == len(labels)  # no repeats
    if not drop:
        assert sorted(labels.tolist()) == list(range(n))
    for xb, yb in got:  # pairs stay aligned
        np.testing.assert_array_equal(xb[:, 0], yb * 10.0)


def test_batches_shuffle_is_seeded_and_can_be_switched_off():
    x, y = np.zeros((20, 1)), np.arange(20)
    order = lambda **kw: np.concatenate([b for _, b in batches(x, y, 6, **kw)])  # noqa: E731
    np.testing.assert_array_equal(order(seed=1), order(seed=1))
    np.testing.assert_array_equal(order(seed=(1, 2)), order(seed=(1, 2)))
    assert not np.array_equal(order(seed=1), order(seed=2))
    assert not np.array_equal(order(seed=(1, 1)), order(seed=(1, 2)))
    np.testing.assert_array_equal(order(seed=1, shuffle=False), y)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_batches_rejects_a_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive int; got batch_size="):
        next(batches(np.zeros(4), np.zeros(4), batch_size, seed=0))


def test_batches_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="x and y must have the same length; got 4 and 3"):
        next(batches(np.zeros(4), np.zeros(3), 2, seed=0))


# ---------------------------------------------------------------- IDX files


def _idx_bytes(array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def _write(path, payload, gz):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def _toy_arrays(seed=0, n_train=12, n_test=5, size=(4, 3), classes=10):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "y_train": (np.arange(n_train) % classes).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "y_test": (np.arange(n_test) % classes).astype(np.uint8),
    }


_NAMES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _write_idx_dir(directory, arrays, gz=False, override=None):
    """Write the four IDX files; ``override`` maps a key to raw bytes to write instead."""
    override = override or {}
    paths = {}
    for key, name in _NAMES.items():
        payload = override.get(key, _idx_bytes(arrays[key]) if key in arrays else None)
        paths[key] = _write(directory / name, payload, gz)
    return paths


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_reads_raw_and_gzipped_files(tmp_path, gz):
    arrays = _toy_arrays()
    _write_idx_dir(tmp_path, arrays, gz=gz)
    data = load_idx(tmp_path)
    np.testing.assert_allclose(data.x_train, arrays["x_train"][..., None] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(data.x_test, arrays["x_test"][..., None] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_train, arrays["y_train"])
    np.testing.assert_array_equal(data.y_test, arrays["y_test"])
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert load(str(tmp_path)).x_train.shape == (12, 4, 3, 1)


@pytest.mark.parametrize(
    "type_code, values",
    [(0x0B, np.array([[-2, 300], [7, 0]])), (0x0D, np.array([[0.5, -1.25], [3.0, 2.0]]))],
)
def test_read_idx_decodes_big_endian_types(tmp_path, type_code, values):
    path = tmp_path / "a.idx"
    path.write_bytes(_idx_bytes(values, type_code))
    got = read_idx(path)
    np.testing.assert_array_equal(got, values)
    assert got.dtype.isnative


def _corrupt(arrays, key):
    """Yield (description, bytes) of broken versions of one IDX file."""
    good = _idx_bytes(arrays[key])
    return {
        "wrong magic": (b"\x00\x01\x08\x03" + good[4:], "wrong magic number"),
        "unknown type": (b"\x00\x00\x07\x03" + good[4:], "wrong magic number"),
        "short header": (good[:2], "truncated header"),
        "cut dimensions": (good[:9], "truncated header"),
        "truncated data": (
            good[:-5],
            r"truncated data: shape \(12, 4, 3\) needs 144 bytes, found 139",
        ),
        "trailing bytes": (good + b"\x00\x00", "2 trailing bytes"),
    }


@pytest.mark.parametrize(
    "problem",
    [
        "wrong magic",
        "unknown type",
        "short header",
        "cut dimensions",
        "truncated data",
        "trailing bytes",
    ],
)
def test_load_idx_names_the_file_and_the_problem(tmp_path, problem):
    arrays = _toy_arrays()
    payload, match = _corrupt(arrays, "x_train")[problem]
    paths = _write_idx_dir(tmp_path, arrays, override={"x_train": payload})
    with pytest.raises(ValueError, match=match) as info:
        load_idx(tmp_path)
    assert str(paths["x_train"]) in str(info.value)


def test_load_idx_rejects_a_corrupt_or_truncated_gzip(tmp_path):
    arrays = _toy_arrays()
    paths = _write_idx_dir(tmp_path, arrays, gz=True)
    whole = paths["y_test"].read_bytes()
    paths["y_test"].write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as info:
        load_idx(tmp_path)
    assert str(paths["y_test"]) in str(info.value)
    paths["y_test"].write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        load_idx(tmp_path)


def test_load_idx_rejects_a_label_count_mismatch(tmp_path):
    arrays = _toy_arrays()
    arrays["y_test"] = arrays["y_test"][:-1]
    paths = _write_idx_dir(tmp_path, arrays)
    with pytest.raises(ValueError, match="shape/label mismatch: 4 labels for 5 images") as info:
        load_idx(tmp_path)
    assert str(paths["y_test"]) in str(info.value)


def test_load_idx_rejects_different_train_and_test_image_shapes(tmp_path):
    arrays = _toy_arrays()
    arrays["x_test"] = arrays["x_test"][:, :, :2]
    _write_idx_dir(tmp_path, arrays)
    with pytest.raises(
        ValueError, match=r"image shape \(4, 2, 1\) differs from the training images' \(4, 3, 1\)"
    ):
        load_idx(tmp_path)


def test_load_idx_rejects_labels_out_of_range(tmp_path):
    arrays = _toy_arrays(classes=3)
    arrays["y_test"][0] = 3  # never seen in training: num_classes inferred as 3
    paths = _write_idx_dir(tmp_path, arrays)
    with pytest.raises(
        ValueError, match=r"labels out of range: found label 3, expected 0..2"
    ) as info:
        load_idx(tmp_path)
    assert str(paths["y_test"]) in str(info.value)
    assert load_idx(tmp_path, num_classes=4).num_classes == 4
    with pytest.raises(ValueError, match=r"labels out of range: found label 2, expected 0..1"):
        load_idx(tmp_path, num_classes=2)


def test_load_idx_rejects_labels_that_are_not_a_vector(tmp_path):
    arrays = _toy_arrays()
    arrays["y_train"] = arrays["y_train"].reshape(3, 4)
    _write_idx_dir(tmp_path, arrays)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\); got shape \(3, 4\)"):
        load_idx(tmp_path)


def test_load_idx_reports_a_missing_file_or_directory(tmp_path):
    arrays = _toy_arrays()
    paths = _write_idx_dir(tmp_path, arrays)
    paths["x_test"].unlink()
    with pytest.raises(FileNotFoundError, match="missing IDX file t10k-images-idx3-ubyte"):
        load_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory of IDX files"):
        load_idx(tmp_path / "nope")
    with pytest.raises(
        ValueError, match="num_classes must be a positive int or None; got num_classes=0"
    ):
        load_idx(tmp_path, num_classes=0)


# ---------------------------------------------------------------- NPZ files


def test_load_npz_scales_uint8_and_keeps_float_and_nhwc(tmp_path):
    arrays = _toy_arrays()
    arrays["x_test"] = np.random.default_rng(1).random((5, 4, 3, 2)).astype(np.float64)
    arrays["x_train"] = np.repeat(arrays["x_train"][..., None], 2, axis=-1)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **arrays)
    data = load_npz(path)
    np.testing.assert_allclose(data.x_train, arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(data.x_test, arrays["x_test"], rtol=1e-6)
    assert data.x_test.dtype == np.float32 and data.in_shape == (4, 3, 2)
    np.testing.assert_array_equal(load(str(path)).y_test, arrays["y_test"])


def _npz_error(tmp_path, arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.pop("y_test"), r"missing arrays \['y_test'\]"),
        (
            lambda a: a.update(y_train=a["y_train"][:-2]),
            "shape/label mismatch: 10 labels for 12 images",
        ),
        (
            lambda a: a.update(y_train=a["y_train"].astype(np.float32)),
            "labels must be integers; got dtype float32",
        ),
        (
            lambda a: a.update(y_test=np.array([0, 1, -1, 2, 3])),
            r"labels out of range: found -1..3",
        ),
        (
            lambda a: a.update(x_train=np.zeros((12, 12))),
            r"images must have 3 or 4 dimensions .* got shape \(12, 12\)",
        ),
        (
            lambda a: a.update(x_train=a["x_train"].astype(np.int64)),
            "images must be uint8 .* got dtype int64",
        ),
        (
            lambda a: a.update(x_test=np.where(a["x_test"] > 128, np.nan, 1.0)),
            r"images must be finite; got \d+ NaN/Inf value",
        ),
        (lambda a: a.update(x_test=a["x_test"][:0], y_test=a["y_test"][:0]), "no test examples"),
    ],
)
def test_load_npz_names_the_array_and_the_problem(tmp_path, change, match):
    arrays = _toy_arrays()
    change(arrays)
    path = _npz_error(tmp_path, arrays)
    with pytest.raises(ValueError, match=match) as info:
        load_npz(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [b"garbage that is no zip", None],  # None: a truncated real archive
)
def test_load_npz_rejects_a_corrupt_or_truncated_archive(tmp_path, payload):
    path = _npz_error(tmp_path, _toy_arrays())
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2] if payload is None else payload)
    with pytest.raises(ValueError, match="not a valid or complete .npz archive") as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_load_npz_rejects_a_single_array_file(tmp_path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="holds a single ndarray, not named arrays"):
        load_npz(path)


# ---------------------------------------------------------------- load(spec)


def test_a_requested_num_classes_is_kept_when_the_labels_stop_below_it(tmp_path):
    arrays = _toy_arrays(classes=4)
    path = _npz_error(tmp_path, arrays)
    assert load_npz(path).num_classes == 4
    assert load_npz(path, num_classes=10).num_classes == 10
    assert load(str(path), num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="num_classes must be a positive int or None; got num_cl"):
        load_npz(path, num_classes=True)
    with pytest.raises(ValueError, match="num_classes must be None or 10 for 'digits'; got num_"):
        load("digits", num_classes=3)


def test_load_dispatches_and_reports_bad_specs(tmp_path):
    assert load("digits").in_shape == (8, 8, 1)
    with pytest.raises(FileNotFoundError, match="data 'missing' not found: expected 'digits'"):
        load("missing")
    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(ValueError, match=r"data.csv: unsupported data file"):
        load(str(other))
