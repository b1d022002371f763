"""Datasets as NumPy arrays: scikit-learn's digits, MNIST-format IDX files, NPZ.

Every loader returns a :class:`Dataset` of NHWC ``float32`` images and
``int32`` labels, and checks what it reads: a bad file raises ``ValueError``
(a missing one ``FileNotFoundError``) whose message names the file and the
problem. Files are untrusted: each header (IDX dimensions, ``.npy`` shape and
dtype) is checked against the file and against ``max_bytes`` before the data
is read or inflated, so a small file cannot make a loader allocate or inflate
more than it declares. :func:`batches` is the seeded shuffling batch iterator.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_MAX_BYTES = 1 << 32  # default bound on the bytes a data file may declare


class Dataset(NamedTuple):
    """A train/test split of images and integer class labels."""

    x_train: np.ndarray  # float32 (N, H, W, C)
    y_train: np.ndarray  # int32 (N,)
    x_test: np.ndarray  # float32 (M, H, W, C)
    y_test: np.ndarray  # int32 (M,)
    classes: int | None = None  # number of classes if known; None: inferred from the labels

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one image, ``(H, W, C)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes: ``classes``, else ``max(label) + 1`` over both splits."""
        if self.classes is not None:
            return self.classes
        return int(max(self.y_train.max(initial=-1), self.y_test.max(initial=-1))) + 1


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits, split stratified by class.

    The 1797 images (pixel values 0..16) are scaled to ``[0, 1]``; the split
    keeps the class proportions in both parts and depends only on ``seed``.

    Args:
      test_fraction: fraction of the examples held out for testing, in (0, 1).
      seed: seed of the split.

    Returns:
      A :class:`Dataset` with images of shape ``(N, 8, 8, 1)``.

    Raises:
      ValueError: if ``test_fraction`` is not in (0, 1).

    Example:
      >>> data = load_digits()
      >>> data.x_train.shape, data.x_test.shape, data.num_classes
      ((1347, 8, 8, 1), (450, 8, 8, 1), 10)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1); got test_fraction={test_fraction!r}")
    from sklearn.datasets import load_digits as _sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch: Any = _sklearn_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = (
        np.asarray(part)
        for part in train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    )
    return Dataset(x_train, y_train, x_test, y_test)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int | Sequence[int],
    shuffle: bool = True,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over ``(x, y)`` mini-batches, shuffled with a seeded permutation.

    Args:
      x: inputs, leading axis = examples.
      y: labels, same leading size as ``x``.
      batch_size: examples per batch, a positive int.
      seed: seed of the permutation; an int or a sequence of ints (e.g.
        ``(seed, epoch)`` for a fresh order each epoch).
      shuffle: if False, keep the order (``seed`` is then unused).
      drop_remainder: drop the last batch if it holds fewer than
        ``batch_size`` examples.

    Returns:
      An iterator of NumPy ``(x_batch, y_batch)`` pairs.

    Raises:
      ValueError: if ``batch_size`` is not a positive int or the leading sizes
        of ``x`` and ``y`` differ.

    Example:
      >>> x, y = np.arange(10.0), np.arange(10)
      >>> [len(b) for b, _ in batches(x, y, 4, seed=0)]
      [4, 4, 2]
      >>> sorted(np.concatenate([b for _, b in batches(x, y, 4, seed=0)]).tolist())
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or (batch_size < 1)
    ):
        raise ValueError(f"batch_size must be a positive int; got batch_size={batch_size!r}")
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length; got {len(x)} and {len(y)}")
    n = len(x)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


# IDX type codes (http://yann.lecun.com/exdb/mnist/): all big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _read_exactly(file: io.BufferedIOBase, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n:
        part = file.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0
    ):
        raise ValueError(
            f"max_bytes must be None or a non-negative integer; got max_bytes={max_bytes!r}"
        )


def _check_declared(
    source: object, shape: tuple, nbytes: int, before: int, max_bytes: int | None
) -> None:
    """``nbytes`` declared by ``shape``, after ``before`` bytes of other arrays, fit the limit."""
    if max_bytes is not None and before + nbytes > max_bytes:
        earlier = f" ({before + nbytes:,} with the arrays before it)" if before else ""
        raise ValueError(
            f"{source}: shape {shape} declares {nbytes:,} bytes{earlier}, "
            f"more than max_bytes={max_bytes:,}"
        )


def read_idx(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read one IDX file (raw or ``.gz``) into a NumPy array.

    The header is two zero bytes, a type code, the number of dimensions, then
    one big-endian uint32 per dimension; the data follows in C order. The
    header is checked first: a gzipped file is inflated as a stream, only as
    far as the header's shape needs plus one byte (to refuse trailing data),
    so a small file that inflates to gigabytes costs no more than its shape.

    Args:
      path: the file.
      max_bytes: the most bytes the data may declare; ``None`` for no limit.
        Default: 4 GiB (:data:`DEFAULT_MAX_BYTES`).

    Returns:
      The array, in native byte order.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: naming the file, if the magic number is wrong, the type
        code unknown, the declared size above ``max_bytes``, the gzip stream
        corrupt, or the data truncated or followed by trailing bytes.
    """
    _check_max_bytes(max_bytes)
    return _read_idx(Path(path), 0, max_bytes)


def _read_idx(path: Path, before: int, max_bytes: int | None) -> np.ndarray:
    """:func:`read_idx` after ``before`` bytes of other files counted against ``max_bytes``."""
    gz = path.suffix == ".gz"
    file = gzip.open(path, "rb") if gz else open(path, "rb")  # closed below
    try:
        return _read_idx_stream(file, path, gz, before, max_bytes)
    except (OSError, EOFError, zlib.error) as err:
        # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err
    except MemoryError as err:
        raise ValueError(f"{path}: the data does not fit in memory ({err})") from err
    finally:
        file.close()


def _read_idx_stream(
    file: io.BufferedIOBase, path: Path, gz: bool, before: int, max_bytes: int | None
) -> np.ndarray:
    raw = _read_exactly(file, 4)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated header: {len(raw)} bytes, need at least 4")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: wrong magic number 0x{raw[:4].hex()}; expected 0x0000TTNN with "
            f"type code TT in {sorted(f'{c:02x}' for c in _IDX_DTYPES)}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    dims = _read_exactly(file, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated header: {4 + len(dims)} bytes, need {4 + 4 * ndim}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    expected = math.prod(shape) * dtype.itemsize
    _check_declared(path, shape, expected, before, max_bytes)
    if not gz:  # the file's size tells at once
        found = os.fstat(file.fileno()).st_size - 4 - 4 * ndim
        if found > expected:
            raise ValueError(
                f"{path}: {found - expected} trailing bytes after the data of shape {shape}"
            )
    data = bytearray(expected)
    view, got = memoryview(data), 0
    while got < expected:
        n = file.readinto(view[got:])
        if not n:
            raise ValueError(
                f"{path}: truncated data: shape {shape} needs {expected} bytes, found {got}"
            )
        got += n
    if file.read(1):
        raise ValueError(f"{path}: trailing bytes after the data of shape {shape}")
    array = np.frombuffer(data, dtype).reshape(shape)
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def _find_idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    # The MNIST mirrors also spell the files with a dot: train-images.idx3-ubyte.
    dotted = stem.replace("-idx", ".idx")
    for name in (dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: missing IDX file {stem} (or {stem}.gz)")


def _images(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(
            f"{source}: images must have 3 or 4 dimensions (N, H, W[, C]); got shape {x.shape}"
        )
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = int(x.size - np.isfinite(x).sum())
            raise ValueError(f"{source}: images must be finite; got {bad} NaN/Inf value(s)")
        return x
    raise ValueError(
        f"{source}: images must be uint8 (scaled by 1/255) or floating point; got dtype {x.dtype}"
    )


def _labels(y: np.ndarray, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must have shape (N,); got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers; got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{source}: labels out of range: found {y.min()}..{y.max()}")
    return y.astype(np.int32)


def _checked_dataset(
    arrays: dict[str, np.ndarray], sources: dict[str, str], num_classes: int | None
) -> Dataset:
    x_train = _images(arrays["x_train"], sources["x_train"])
    x_test = _images(arrays["x_test"], sources["x_test"])
    y_train = _labels(arrays["y_train"], sources["y_train"])
    y_test = _labels(arrays["y_test"], sources["y_test"])
    for x, y, xs, ys in (
        (x_train, y_train, "x_train", "y_train"),
        (x_test, y_test, "x_test", "y_test"),
    ):
        if len(x) != len(y):
            raise ValueError(
                f"{sources[ys]}: shape/label mismatch: {len(y)} labels for "
                f"{len(x)} images in {sources[xs]}"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{sources['x_test']}: image shape {x_test.shape[1:]} differs from the "
            f"training images' {x_train.shape[1:]} in {sources['x_train']}"
        )
    if len(y_train) == 0:
        raise ValueError(f"{sources['y_train']}: no training examples")
    if len(y_test) == 0:
        raise ValueError(f"{sources['y_test']}: no test examples")
    if num_classes is None:
        num_classes = int(y_train.max()) + 1
    for y, ys in ((y_train, "y_train"), (y_test, "y_test")):
        if y.size and y.max() >= num_classes:
            raise ValueError(
                f"{sources[ys]}: labels out of range: found label {int(y.max())}, "
                f"expected 0..{num_classes - 1}"
            )
    return Dataset(x_train, y_train, x_test, y_test, num_classes)


def _check_num_classes(num_classes: int | None) -> None:
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1
    ):
        raise ValueError(
            f"num_classes must be a positive int or None; got num_classes={num_classes!r}"
        )


def load_idx(
    directory: str | os.PathLike,
    *,
    num_classes: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Load an MNIST-format dataset from a directory of IDX files.

    The directory holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each raw or
    gzipped (``.gz``). uint8 images are scaled to ``[0, 1]``.

    Args:
      directory: the directory.
      num_classes: labels must lie in ``[0, num_classes)``; ``None`` infers it
        as ``max(y_train) + 1`` (the test labels are then checked against it).
      max_bytes: the most bytes the four files' data may declare together
        (checked from each header before its data is read); ``None`` for no
        limit. Default: 4 GiB.

    Returns:
      A :class:`Dataset` with images of shape ``(N, H, W, 1)``.

    Raises:
      FileNotFoundError: if the directory or one of the four files is missing.
      ValueError: if a file is corrupt (see :func:`read_idx`), the number of
        labels differs from the number of images, or a label is out of range.
    """
    _check_num_classes(num_classes)
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory of IDX files")
    _check_max_bytes(max_bytes)
    paths = {key: _find_idx_file(directory, stem) for key, stem in _IDX_FILES.items()}
    arrays: dict[str, np.ndarray] = {}
    for key, path in paths.items():
        arrays[key] = _read_idx(path, sum(a.nbytes for a in arrays.values()), max_bytes)
    return _checked_dataset(arrays, {k: str(p) for k, p in paths.items()}, num_classes)


def load_npz(
    path: str | os.PathLike,
    *,
    num_classes: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Dataset:
    """Load a dataset from an ``.npz`` file with ``x_train, y_train, x_test, y_test``.

    Images may be ``(N, H, W)`` or ``(N, H, W, C)``, uint8 (scaled to
    ``[0, 1]``) or floating point; labels are integers of shape ``(N,)``.
    Each member's ``.npy`` header (shape and dtype) is checked against its
    size in the zip directory and ``max_bytes`` before its data is inflated.

    Args:
      path: the file (read without pickles).
      num_classes: as in :func:`load_idx`.
      max_bytes: the most bytes the four arrays may declare together;
        ``None`` for no limit. Default: 4 GiB.

    Returns:
      A :class:`Dataset`.

    Raises:
      FileNotFoundError: if the file does not exist.
      ValueError: if it is not a valid NPZ archive, lacks one of the four
        arrays, or the arrays disagree (see :func:`load_idx`).

    Example:
      >>> import tempfile, os
      >>> rng = np.random.default_rng(0)
      >>> arrays = dict(x_train=rng.random((6, 4, 4), dtype=np.float32),
      ...               y_train=np.array([0, 1, 2, 0, 1, 2]),
      ...               x_test=rng.random((2, 4, 4), dtype=np.float32), y_test=np.array([2, 0]))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     np.savez(os.path.join(d, 'toy.npz'), **arrays)
      ...     data = load_npz(os.path.join(d, 'toy.npz'))
      >>> data.x_train.shape, data.y_test.dtype.name, data.num_classes
      ((6, 4, 4, 1), 'int32', 3)
    """
    _check_num_classes(num_classes)
    _check_max_bytes(max_bytes)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
            raise ValueError(f"{path}: holds a single ndarray, not named arrays")
    try:
        with zipfile.ZipFile(path) as npz:
            members = {name.removesuffix(".npy"): npz.getinfo(name) for name in npz.namelist()}
            missing = [key for key in _IDX_FILES if key not in members]
            if missing:
                raise _NpzRefusal(f"{path}: missing arrays {missing}; found {sorted(members)}")
            before = 0
            for key in _IDX_FILES:  # every header first: nothing is inflated past them
                before += _check_npy_member(npz, members[key], f"{path}[{key}]", before, max_bytes)
            arrays = {}
            for key in _IDX_FILES:
                with npz.open(members[key]) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
    except _NpzRefusal as err:
        raise ValueError(str(err)) from None
    except (ValueError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"{path}: not a valid or complete .npz archive ({err})") from err
    except MemoryError as err:
        raise ValueError(f"{path}: the arrays do not fit in memory ({err})") from err
    sources = {key: f"{path}[{key}]" for key in _IDX_FILES}
    return _checked_dataset(arrays, sources, num_classes)


_NPY_MAGIC = b"\x93NUMPY"


class _NpzRefusal(ValueError):
    """A member whose header the loader refuses; the message names it in full."""


def _check_npy_member(
    npz: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, before: int, max_bytes: int | None
) -> int:
    """Check one member's ``.npy`` header; return the bytes its array declares."""
    with npz.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise _NpzRefusal(f"{source}: unsupported .npy format version {version}")
        header = member.tell()
    if dtype.hasobject:
        raise _NpzRefusal(f"{source}: dtype {dtype} holds Python objects (pickles are refused)")
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        _check_declared(source, shape, nbytes, before, max_bytes)
    except ValueError as err:
        raise _NpzRefusal(str(err)) from None
    if info.file_size != header + nbytes:
        raise _NpzRefusal(
            f"{source}: the member holds {info.file_size:,} bytes; its header of {header} bytes "
            f"declares shape {shape} of {dtype}, {header + nbytes:,} bytes in all"
        )
    return nbytes


def load(
    spec: str, *, num_classes: int | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> Dataset:
    """Load ``'digits'``, an IDX directory, or an ``.npz`` file.

    Args:
      spec: ``'digits'`` (:func:`load_digits`), a directory (:func:`load_idx`)
        or a path ending in ``.npz`` (:func:`load_npz`).
      num_classes: passed to the file loaders; for ``'digits'`` it must be
        ``None`` or 10.
      max_bytes: passed to the file loaders.

    Returns:
      A :class:`Dataset`.

    Raises:
      FileNotFoundError: if the path does not exist.
      ValueError: if the path is a file that is not ``.npz``, or the loader
        rejects it.

    Example:
      >>> load('digits').x_test.shape
      (450, 8, 8, 1)
    """
    _check_num_classes(num_classes)
    if spec == "digits":
        digits = load_digits()
        if num_classes not in (None, digits.num_classes):
            raise ValueError(
                f"num_classes must be None or {digits.num_classes} for 'digits'; "
                f"got num_classes={num_classes!r}"
            )
        return digits
    path = Path(spec)
    if path.is_dir():
        return load_idx(path, num_classes=num_classes, max_bytes=max_bytes)
    if not path.exists():
        raise FileNotFoundError(
            f"data {spec!r} not found: expected 'digits', an IDX directory or an .npz file"
        )
    if path.suffix != ".npz":
        raise ValueError(
            f"{path}: unsupported data file; expected 'digits', an IDX directory or an .npz file"
        )
    return load_npz(path, num_classes=num_classes, max_bytes=max_bytes)
