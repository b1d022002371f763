"""Compressed, checksummed archive of a parameter pytree (Deep Compression storage).

A tensor given a :class:`~jaxopt_nn.quantization.Codebook` is stored as the
positions of its kept weights (relative indices: gaps, with a filler symbol
when a gap is too long for the index width), the codebook index of each kept
weight, both Huffman-coded, and the used centroids. Other selected tensors are
stored sparse (positions + raw nonzero values) or raw, whichever is smaller;
unselected leaves (biases, norm scales) are stored raw, optionally in a
narrower float type. Everything but that optional cast is lossless: ``load``
returns the same tree, shapes, dtypes and bits.

The byte layout is documented in ``docs/archive-format.md``. Every file ends
with a CRC32 of all bytes before it and each tensor's section carries its own
CRC32, so a damaged file raises :class:`ArchiveError` instead of returning
wrong weights.

Example:
  >>> import numpy as np
  >>> params = {'dense': {'kernel': np.eye(4, dtype=np.float32), 'bias': np.ones(4, np.float32)}}
  >>> restored = loads(dumps(params))
  >>> np.array_equal(restored['dense']['kernel'], params['dense']['kernel'])
  True
  >>> [(t.name, t.method, t.kept) for t in inspect(dumps(params)).tensors]
  [('dense/bias', 'raw', 4), ('dense/kernel', 'sparse', 4)]

References:
  Han, Mao and Dally, "Deep Compression: Compressing Deep Neural Networks with
  Pruning, Trained Quantization and Huffman Coding", ICLR,
  https://arxiv.org/abs/1510.00149, 2016 (section 2: relative indices with
  filler zeros; section 4: Huffman coding of weights and indices).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxopt_nn import huffman
from jaxopt_nn import tree as tree_lib
from jaxopt_nn.quantization import Codebook

PyTree = Any

MAGIC = b"JNZ"
VERSION = 1
_MAX_LENGTH = 15  # code length limit while <= 2**15 symbols are used (4-bit table entries)
_MAX_INDEX_BITS = 16
_MAX_HEADER = 1 << 26  # bytes of decompressed JSON accepted
MAX_NDIM = 64  # dimensions of a tensor the reader accepts (NumPy's limit)
MAX_ELEMENTS = 1 << 40  # elements of a tensor (and size of any one dimension) the reader accepts
# Preset dictionary of the raw-deflate header: common keys and record prefixes.
HEADER_DICTIONARY = (
    b'"params":{"batch_stats":"mean":"var":"scale":["s",[":["r",[":["q",['
    b'"bias":["r",[,"f4","f2"]"kernel":["q",[{"fc1":{"fc2":{"fc3":{"conv1":{"Dense_0":{'
)

_DTYPES = {
    np.dtype(name).str[1:]: np.dtype(name)
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
_DTYPES["bfloat16"] = np.dtype(ml_dtypes.bfloat16)
_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_ITEMSIZE = {dtype.name: dtype.itemsize for dtype in _DTYPES.values()}
# Centroid storage types, narrowest first; the tags are NumPy's type characters.
_CENTROID_DTYPES = {
    b"e": np.dtype(np.float16),
    b"f": np.dtype(np.float32),
    b"d": np.dtype(np.float64),
}
_CENTROID_TAGS = {dtype: tag for tag, dtype in _CENTROID_DTYPES.items()}
_METHODS = {"r": "raw", "s": "sparse", "q": "codebook"}
# Root keys of a header that carries metadata: {"#m": metadata, "#t": tree}.
_META_KEY, _TREE_KEY = "#m", "#t"


class ArchiveError(ValueError):
    """The bytes are not a valid archive: bad magic or version, truncated, corrupt."""


class TensorInfo(NamedTuple):
    """Storage of one leaf; ``nbytes = index_bytes + value_bytes + codebook_bytes + 4``."""

    name: str  # readable path, e.g. 'fc1/kernel'
    shape: tuple[int, ...]
    dtype: str  # dtype of the leaf as loaded
    method: str  # 'raw', 'sparse' or 'codebook'
    size: int  # number of scalars
    kept: int  # stored (nonzero / kept) scalars; size for raw
    weight_bits: float  # bits per kept scalar for its value (Huffman average for codebooks)
    index_bits: float  # bits per kept scalar for its position (Huffman average; 0 for raw)
    index_bytes: int  # bytes of the position stream (index width, code table, chunk index, bits)
    value_bytes: int  # bytes of the values (codebook-index stream or raw values)
    codebook_bytes: int  # bytes of the centroids and their dtype tag
    nbytes: int  # bytes of the whole section, CRC32 included


class ArchiveInfo(NamedTuple):
    """Byte accounting of an archive: ``header_bytes + sum(t.nbytes) == file_bytes``."""

    tensors: list[TensorInfo]  # one per leaf, in the order stored
    header_bytes: int  # magic, version, header length, compressed JSON header, file CRC32
    file_bytes: int  # total size of the archive
    metadata: dict[str, Any] | None = None  # the JSON metadata given to save, if any

    @property
    def original_bytes(self) -> int:
        """Bytes of all leaves at their own dtype (the uncompressed size)."""
        return sum(t.size * _ITEMSIZE[t.dtype] for t in self.tensors)

    @property
    def compression(self) -> float:
        """``original_bytes / file_bytes``."""
        return self.original_bytes / self.file_bytes

    def table(self) -> str:
        """Per-tensor table (Deep Compression style); the bytes column sums to the file size."""
        rows = [
            [
                t.name,
                "x".join(map(str, t.shape)) or "()",
                t.method,
                t.size,
                f"{100 * t.kept / max(t.size, 1):.1f}%",
                f"{t.weight_bits:.2f}",
                f"{t.index_bits:.2f}",
                t.nbytes,
                f"{t.size * _ITEMSIZE[t.dtype] / t.nbytes:.1f}x",
            ]
            for t in self.tensors
        ]
        rows.append(["(header)", "", "", "", "", "", "", self.header_bytes, ""])
        size = sum(t.size for t in self.tensors)
        kept = sum(t.kept for t in self.tensors)
        rows.append(
            [
                "total",
                "",
                "",
                size,
                f"{100 * kept / max(1, size):.1f}%",
                "",
                "",
                self.file_bytes,
                f"{self.compression:.1f}x",
            ]
        )
        headers = [
            "tensor",
            "shape",
            "method",
            "weights",
            "kept",
            "weight bits",
            "index bits",
            "bytes",
            "compression",
        ]
        return tree_lib.format_table(headers, rows)


# ----------------------------------------------------------------------------- bytes


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


class _Reader:
    """Bounded reads from a section; running past its end is an ArchiveError."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArchiveError(
                f"{self.what}: needs {n} more bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left (inconsistent lengths)"
            )
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 64, 7):
            byte = self.read(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
        raise ArchiveError(f"{self.what}: malformed variable-length integer")


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    bits = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def _unpack_bits(data: bytes, count: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[: count * width].reshape(count, width)
    return bits.astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))


# ----------------------------------------------------------------------------- streams


def _length_limit(used: int) -> int:
    """Longest code the writer uses for ``used`` coded symbols (the reader's limit too)."""
    return max(_MAX_LENGTH, (used - 1).bit_length())


def _stream_lengths(counts: np.ndarray) -> np.ndarray:
    used = int(np.count_nonzero(counts))
    lengths = huffman.code_lengths(counts, max_length=_length_limit(used))
    return lengths[: np.flatnonzero(lengths)[-1] + 1] if used else lengths[:0]


def _chunk_size(count: int) -> int:
    """Symbols per independently decodable chunk: few chunks for short streams, more lanes
    for the lockstep decoder on long ones."""
    return 4096 if count <= 2**16 else 1024


def _chunk_dtype(lengths: np.ndarray) -> str:
    return "<u2" if int(lengths.max()) <= _MAX_LENGTH else "<u4"


def _stream_bytes(counts: np.ndarray) -> int:
    """Exact size of the stream :func:`_write_stream` makes for symbols with these counts."""
    count = int(counts.sum())
    size = len(_varint_bytes(count))
    if count:
        lengths = _stream_lengths(counts)
        num_bits = int(np.dot(counts[: lengths.size], lengths.astype(np.int64)))
        num_chunks = -(-count // _chunk_size(count))
        size += (
            len(_varint_bytes(lengths.size))
            + 1
            + -(-lengths.size * int(lengths.max()).bit_length() // 8)
            + (num_chunks - 1) * np.dtype(_chunk_dtype(lengths)).itemsize
            + len(_varint_bytes(num_bits))
            + (num_bits + 7) // 8
        )
    return size


def _varint_bytes(value: int) -> bytearray:
    out = bytearray()
    _put_varint(out, value)
    return out


def _write_stream(out: bytearray, symbols: np.ndarray, num_symbols: int) -> None:
    """count, code-length table, chunk bit lengths, bit count, packed codewords."""
    _put_varint(out, symbols.size)
    if not symbols.size:
        return
    lengths = _stream_lengths(np.bincount(symbols, minlength=num_symbols))
    width = int(lengths.max()).bit_length()
    _put_varint(out, lengths.size)
    out.append(width)
    out += _pack_bits(lengths.astype(np.int64), width)
    stream = huffman.encode(symbols, lengths, chunk_size=_chunk_size(symbols.size))
    out += np.diff(stream.chunk_offsets).astype(_chunk_dtype(lengths)).tobytes()
    _put_varint(out, stream.num_bits)
    out += stream.data


def _read_stream(reader: _Reader, num_symbols: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`_write_stream`: (symbols, payload bits)."""
    count = reader.varint()
    if not count:
        return np.zeros(0, np.int64), 0
    table_size = reader.varint()
    if not 1 <= table_size <= num_symbols:
        raise ArchiveError(
            f"{reader.what}: code table of {table_size} symbols, alphabet has {num_symbols}"
        )
    width = reader.read(1)[0]
    if not 1 <= width <= 5:
        raise ArchiveError(f"{reader.what}: code-length width {width} not in [1, 5]")
    lengths = _unpack_bits(reader.read(-(-table_size * width // 8)), table_size, width)
    used = int(np.count_nonzero(lengths))
    if not used:
        raise ArchiveError(f"{reader.what}: code table assigns no codeword")
    if int(lengths.max()) > _length_limit(used):
        raise ArchiveError(
            f"{reader.what}: code length {int(lengths.max())} exceeds "
            f"{_length_limit(used)} bits, the limit for {used} coded symbols"
        )
    chunk_dtype = np.dtype(_chunk_dtype(lengths))
    chunk_bits = np.frombuffer(
        reader.read((-(-count // _chunk_size(count)) - 1) * chunk_dtype.itemsize), chunk_dtype
    )
    num_bits = reader.varint()
    if count > num_bits:
        raise ArchiveError(f"{reader.what}: {count} symbols cannot fit {num_bits} bits")
    data = reader.read((num_bits + 7) // 8)
    offsets = np.concatenate([[0], np.cumsum(chunk_bits, dtype=np.int64)])
    try:
        symbols = huffman.decode(
            huffman.EncodedStream(data, num_bits, offsets, _chunk_size(count)), lengths, count
        )
    except ValueError as err:
        raise ArchiveError(f"{reader.what}: {err}") from err
    return symbols.astype(np.int64), num_bits


# ----------------------------------------------------------------------------- positions


def _gap_symbols(positions: np.ndarray, index_bits: int) -> np.ndarray:
    """Relative indices: gap before each kept position, fillers for gaps >= 2**bits - 1."""
    filler = (1 << index_bits) - 1
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps // filler
    symbols = np.full(positions.size + int(fillers.sum()), filler, np.int64)
    symbols[np.cumsum(fillers + 1) - 1] = gaps % filler
    return symbols


def _gap_counts(gaps: np.ndarray, index_bits: int) -> np.ndarray:
    filler = (1 << index_bits) - 1
    counts = np.bincount(gaps % filler, minlength=filler + 1)
    counts[filler] += int((gaps // filler).sum())
    return counts


def _best_index_bits(positions: np.ndarray) -> int:
    """Index width whose coded position stream is smallest (ties: the narrower)."""
    gaps = np.diff(positions, prepend=-1) - 1
    widest = min(_MAX_INDEX_BITS, int(gaps.max(initial=0) + 1).bit_length())
    sizes = [_stream_bytes(_gap_counts(gaps, bits)) for bits in range(1, widest + 1)]
    return 1 + int(np.argmin(sizes))


def _positions(symbols: np.ndarray, index_bits: int, size: int, what: str) -> np.ndarray:
    filler = (1 << index_bits) - 1
    is_filler = symbols == filler
    ends = np.cumsum(np.where(is_filler, filler, symbols + 1)) - 1
    positions = ends[~is_filler]
    if positions.size and positions[-1] >= size:
        raise ArchiveError(f"{what}: kept position {positions[-1]} outside a tensor of {size}")
    return positions


# ----------------------------------------------------------------------------- leaves


def _dtype_code(dtype: np.dtype, name: str) -> str:
    if dtype not in _DTYPE_CODES:
        raise TypeError(
            f"leaf {name!r} has dtype {dtype}, which the archive cannot store; "
            f"supported: {sorted(str(d) for d in _DTYPE_CODES)}"
        )
    return _DTYPE_CODES[dtype]


def _record_dtypes(record: list) -> tuple[np.dtype, np.dtype]:
    """(dtype of the loaded leaf, dtype of its raw data in the file) of a header record."""
    dtype = _DTYPES[record[3] if len(record) > 3 else "f4"]
    return dtype, _DTYPES[record[4]] if len(record) > 4 else dtype


def _nonzero_bits(flat: np.ndarray) -> np.ndarray:
    """Kept positions of a leaf: any bit set (so -0.0 is kept, bit-exact)."""
    return np.flatnonzero(flat.view(f"u{flat.dtype.itemsize}"))


def _encode_positions(out: bytearray, positions: np.ndarray, index_bits: int | None) -> None:
    bits = _best_index_bits(positions) if index_bits is None else index_bits
    out.append(bits)
    _write_stream(out, _gap_symbols(positions, bits), 1 << bits)


def _encode_codebook(
    leaf: np.ndarray,
    codebook: Codebook,
    index_bits: int | None,
    centroid_dtype: np.dtype | None,
    name: str,
) -> bytes:
    mask = np.asarray(codebook.mask)
    indices = np.asarray(codebook.indices)
    centroids = np.asarray(codebook.centroids)
    if mask.shape != leaf.shape or indices.shape != leaf.shape:
        raise ValueError(
            f"codebook for {name!r} has mask shape {mask.shape} and indices shape "
            f"{indices.shape}; the leaf has shape {leaf.shape}"
        )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        raise TypeError(f"codebook leaf {name!r} must be floating; got dtype {leaf.dtype}")
    positions = np.flatnonzero(mask.reshape(-1))
    kept = indices.reshape(-1)[positions].astype(np.int64)
    if kept.size and not 0 <= kept.min() <= kept.max() < centroids.size:
        raise ValueError(
            f"codebook for {name!r} has indices in [{kept.min()}, {kept.max()}] "
            f"but {centroids.size} centroids"
        )
    used = np.flatnonzero(np.bincount(kept, minlength=centroids.size))
    values = centroids.astype(leaf.dtype)[used]  # exactly what codebook_weights(..., dtype) holds
    if centroid_dtype is None:  # the narrowest type that holds every value bit-exactly
        bits = f"u{leaf.dtype.itemsize}"
        centroid_dtype = next(
            dtype
            for dtype in _CENTROID_DTYPES.values()
            if np.array_equal(values.astype(dtype).astype(leaf.dtype).view(bits), values.view(bits))
        )
    out = bytearray()
    _encode_positions(out, positions, index_bits)
    _write_stream(out, np.searchsorted(used, kept), used.size)
    out += _CENTROID_TAGS[centroid_dtype]
    out += values.astype(centroid_dtype.newbyteorder("<")).tobytes()
    return bytes(out)


def _encode_sparse(flat: np.ndarray, index_bits: int | None) -> bytes:
    positions = _nonzero_bits(flat)
    out = bytearray()
    _encode_positions(out, positions, index_bits)
    out += flat[positions].astype(flat.dtype.newbyteorder("<")).tobytes()
    return bytes(out)


def _as_array(leaf: Any, name: str) -> np.ndarray:
    array = np.asarray(leaf)
    if array.dtype == object:
        raise TypeError(f"leaf {name!r} is a {type(leaf).__name__}, not an array")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def _encode_leaf(
    name: str, leaf: np.ndarray, selected: bool, codebook: Codebook | None, options: dict
) -> tuple[list, bytes]:
    """(header record, section payload) of one leaf."""
    dtype_code = _dtype_code(leaf.dtype, name)
    stored = leaf.dtype
    if codebook is not None:
        method, payload = (
            "q",
            _encode_codebook(
                leaf, codebook, options["index_bits"], options["centroid_dtype"], name
            ),
        )
    else:
        flat = leaf.reshape(-1)
        method, payload = "r", None
        if selected:
            sparse = _encode_sparse(flat, options["index_bits"])
            if len(sparse) < flat.nbytes:
                method, payload = "s", sparse
        elif options["raw_dtype"] is not None and jnp.issubdtype(leaf.dtype, jnp.floating):
            stored = options["raw_dtype"]
        if payload is None:
            payload = flat.astype(stored.newbyteorder("<")).tobytes()
    record = [method, list(leaf.shape), len(payload) + 4]
    if stored != leaf.dtype:
        record += [dtype_code, _dtype_code(stored, name)]
    elif dtype_code != "f4":
        record.append(dtype_code)
    return record, payload


def _decode_leaf(
    name: str, record: list, payload: bytes, *, materialize: bool
) -> tuple[np.ndarray | None, TensorInfo]:
    """Check a section and account for its bytes; build the dense leaf only if ``materialize``."""
    method, shape = record[0], tuple(record[1])
    dtype, stored = _record_dtypes(record)
    size = math.prod(shape)
    reader = _Reader(payload, f"tensor {name!r}")
    index_bytes = value_bytes = codebook_bytes = 0
    index_bits = weight_bits = 0.0
    if method == "r":
        raw = np.frombuffer(reader.read(size * stored.itemsize), stored.newbyteorder("<"))
        kept, value_bytes, weight_bits = size, reader.pos, 8.0 * stored.itemsize
    else:
        bits = reader.read(1)[0]
        if not 1 <= bits <= _MAX_INDEX_BITS:
            raise ArchiveError(f"tensor {name!r}: index width {bits} not in [1, {_MAX_INDEX_BITS}]")
        gaps, position_bits = _read_stream(reader, 1 << bits)
        positions = _positions(gaps, bits, size, reader.what)
        kept, index_bytes = positions.size, reader.pos
        if method == "q":
            value_symbols, value_bits = _read_stream(reader, max(kept, 1))
            if value_symbols.size != kept:
                raise ArchiveError(
                    f"tensor {name!r}: {value_symbols.size} codebook indices for "
                    f"{kept} kept positions (inconsistent lengths)"
                )
            value_bytes = reader.pos - index_bytes
            tag = reader.read(1)
            if tag not in _CENTROID_DTYPES:
                raise ArchiveError(f"tensor {name!r}: unknown centroid dtype tag {tag!r}")
            centroid_dtype = _CENTROID_DTYPES[tag].newbyteorder("<")
            num_centroids = int(value_symbols.max()) + 1 if kept else 0
            centroids = np.frombuffer(
                reader.read(num_centroids * centroid_dtype.itemsize), centroid_dtype
            )
            codebook_bytes = reader.pos - index_bytes - value_bytes
            weight_bits = value_bits / max(kept, 1)
        else:
            values = np.frombuffer(reader.read(kept * dtype.itemsize), dtype.newbyteorder("<"))
            value_bytes, weight_bits = reader.pos - index_bytes, 8.0 * dtype.itemsize
        index_bits = position_bits / max(kept, 1)
    if reader.pos != len(payload):
        raise ArchiveError(
            f"tensor {name!r}: {len(payload) - reader.pos} unexpected bytes at "
            "the end of its section (inconsistent lengths)"
        )
    info = TensorInfo(
        name,
        shape,
        dtype.name,
        _METHODS[method],
        size,
        kept,
        weight_bits,
        index_bits,
        index_bytes,
        value_bytes,
        codebook_bytes,
        len(payload) + 4,
    )
    if not materialize:
        return None, info
    if method == "r":
        return raw.astype(dtype).reshape(shape), info
    flat = np.zeros(size, dtype)
    flat[positions] = centroids.astype(dtype)[value_symbols] if method == "q" else values
    return flat.reshape(shape), info


# ----------------------------------------------------------------------------- tree <-> header


def _container_key(key: Any, name: str) -> tuple[bool, Any]:
    """(is a sequence index, key) of one step of a key path."""
    if isinstance(key, jax.tree_util.SequenceKey):
        return True, key.idx
    if isinstance(key, jax.tree_util.DictKey):
        value = key.key
    elif isinstance(key, jax.tree_util.GetAttrKey):
        value = key.name
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
        value = key.key
    else:
        raise TypeError(f"leaf {name!r}: cannot store key {key!r}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
        raise TypeError(f"leaf {name!r}: dict keys must be str or int; got {value!r}")
    return False, value if isinstance(value, str) else int(value)


def _strip_variable(path: tuple) -> tuple:
    keys = list(path)
    while (
        keys
        and isinstance(keys[-1], jax.tree_util.GetAttrKey)
        and (keys[-1].name in tree_lib._VARIABLE_ATTRS)
    ):
        keys.pop()
    return tuple(keys)


class _Node:
    def __init__(self, is_list: bool):
        self.is_list, self.items = is_list, {}


def _to_json(node: Any) -> Any:
    if not isinstance(node, _Node):
        return node
    if node.is_list:
        items = [None] * (max(node.items) + 1 if node.items else 0)
        for index, child in node.items.items():
            items[index] = _to_json(child)
        return items
    # Keys starting with '#' are reserved for the header's own structure.
    if all(isinstance(k, str) and not k.startswith("#") for k in node.items):
        return {k: _to_json(v) for k, v in node.items.items()}
    return {"#": [[k, _to_json(v)] for k, v in node.items.items()]}


def _header_tree(paths: list[tuple], records: list[list]) -> Any:
    if len(paths) == 1 and not paths[0]:
        return records[0]
    root = None
    for path, record in zip(paths, records, strict=True):
        name = tree_lib.path_name(path)
        if not path:
            raise TypeError("a tree with a bare leaf must hold no other leaf")
        steps = [_container_key(k, name) for k in path]
        if root is None:
            root = _Node(steps[0][0])
        node = root
        for depth, (is_list, key) in enumerate(steps):
            if node.is_list != is_list:
                raise TypeError(f"leaf {name!r}: a node is both a sequence and a mapping")
            if depth == len(steps) - 1:
                node.items[key] = record
            else:
                node = node.items.setdefault(key, _Node(steps[depth + 1][0]))
    return _to_json(root if root is not None else _Node(False))


def _read_tree(node: Any, path: tuple, leaves: list) -> Any:
    """Rebuild the tree with placeholders; collect (path, record) in order."""
    if isinstance(node, list) and node and isinstance(node[0], str):
        _check_record(node, path)
        leaves.append((path, node))
        return len(leaves) - 1
    if isinstance(node, list):
        return [
            None if child is None else _read_tree(child, (*path, i), leaves)
            for i, child in enumerate(node)
        ]
    if isinstance(node, dict) and set(node) == {"#"} and isinstance(node["#"], list):
        items = node["#"]
        if not all(
            isinstance(i, list)
            and len(i) == 2
            and isinstance(i[0], (str, int))
            and not isinstance(i[0], bool)
            for i in items
        ):
            raise ArchiveError("header: malformed mapping entry")
        _check_unique([k for k, _ in items], f"the mapping at {'/'.join(map(str, path))!r}")
        return {k: _read_tree(v, (*path, k), leaves) for k, v in items}
    if isinstance(node, dict):
        return {k: _read_tree(v, (*path, k), leaves) for k, v in node.items()}
    raise ArchiveError(f"header: unexpected node {node!r:.40} at {'/'.join(map(str, path))!r}")


def _check_unique(keys: list, where: str) -> None:
    if len(set(keys)) != len(keys):
        duplicate = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ArchiveError(f"header: key {duplicate!r} appears twice in {where}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys (``json`` would keep the last silently)."""
    _check_unique([k for k, _ in pairs], "a JSON object")
    return dict(pairs)


def _check_record(record: list, path: tuple) -> None:
    name = "/".join(map(str, path))
    ok = (
        3 <= len(record) <= 5
        and record[0] in _METHODS
        and isinstance(record[1], list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in record[1])
        and isinstance(record[2], int)
        and not isinstance(record[2], bool)
        and record[2] >= 4
        and all(isinstance(c, str) and c in _DTYPES for c in record[3:])
    )
    if not ok:
        raise ArchiveError(f"header: malformed record for tensor {name!r}: {record!r:.80}")
    shape = record[1]
    if len(shape) > MAX_NDIM:
        raise ArchiveError(
            f"header: tensor {name!r} has {len(shape)} dimensions; "
            f"this reader accepts at most {MAX_NDIM}"
        )
    if max(shape, default=0) > MAX_ELEMENTS or math.prod(shape) > MAX_ELEMENTS:
        raise ArchiveError(
            f"header: tensor {name!r} has shape {shape!r:.80}; this reader accepts at most "
            f"2**{MAX_ELEMENTS.bit_length() - 1} elements (and as many per dimension)"
        )


def _fill(node: Any, arrays: list) -> Any:
    if isinstance(node, int):
        return arrays[node]
    if isinstance(node, list):
        return [None if child is None else _fill(child, arrays) for child in node]
    return {k: _fill(v, arrays) for k, v in node.items()}


# ----------------------------------------------------------------------------- public API


def _check_metadata(metadata: Any) -> dict[str, Any] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict or None; got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(dict(metadata)))
    except (TypeError, ValueError) as err:
        raise TypeError(f"metadata must be JSON-serialisable: {err}") from err


def _check_raw_dtype(value: Any, name: str = "raw_dtype") -> np.dtype | None:
    """``value`` as a float dtype leaves may be stored in raw, or ``None``."""
    if value is None:
        return None
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype not in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        raise ValueError(
            f"{name} must be None, float16, bfloat16, float32 or float64; got {name}={value!r}"
        )
    return dtype


def _check_options(index_bits: Any, raw_dtype: Any, centroid_dtype: Any) -> dict:
    if index_bits is not None and (
        not isinstance(index_bits, (int, np.integer))
        or isinstance(index_bits, bool)
        or not 1 <= index_bits <= _MAX_INDEX_BITS
    ):
        raise ValueError(
            f"index_bits must be None (choose per tensor) or an integer in "
            f"[1, {_MAX_INDEX_BITS}]; got index_bits={index_bits!r}"
        )
    raw_dtype = _check_raw_dtype(raw_dtype)
    if centroid_dtype is not None:
        centroid_dtype = np.dtype(centroid_dtype)
        if centroid_dtype not in _CENTROID_TAGS:
            raise ValueError(
                "centroid_dtype must be None (lossless), float16, float32 or float64; "
                f"got centroid_dtype={centroid_dtype}"
            )
    return {"index_bits": index_bits, "raw_dtype": raw_dtype, "centroid_dtype": centroid_dtype}


def dumps(
    params: PyTree,
    *,
    codebooks: Mapping[str, Codebook] | None = None,
    where: tree_lib.Where = None,
    index_bits: int | None = None,
    raw_dtype: Any = None,
    centroid_dtype: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> bytes:
    """Serialise a parameter pytree to archive bytes (see :func:`save`)."""
    options = _check_options(index_bits, raw_dtype, centroid_dtype)
    metadata = _check_metadata(metadata)
    codebooks = dict(codebooks or {})
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    names = [tree_lib.path_name(path) for path, _ in flat]
    unknown = sorted(set(codebooks) - set(names))
    if unknown:
        raise ValueError(f"codebooks names {unknown} are not leaves of params; leaves: {names}")
    flags = jax.tree.leaves(tree_lib.select(params, where))
    records, sections = [], bytearray()
    for (_, leaf), name, flag in zip(flat, names, flags, strict=True):
        record, payload = _encode_leaf(
            name, _as_array(leaf, name), flag, codebooks.get(name), options
        )
        records.append(record)
        sections += payload + zlib.crc32(payload).to_bytes(4, "little")
    header = _header_tree([_strip_variable(path) for path, _ in flat], records)
    if metadata is not None:
        header = {_META_KEY: metadata, _TREE_KEY: header}
    text = json.dumps(header, separators=(",", ":")).encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
    compressed = packer.compress(text) + packer.flush()
    out = bytearray(MAGIC)
    out.append(VERSION)
    _put_varint(out, len(compressed))
    out += compressed
    out += sections
    out += zlib.crc32(out).to_bytes(4, "little")
    return bytes(out)


def save(
    path: str | os.PathLike,
    params: PyTree,
    *,
    codebooks: Mapping[str, Codebook] | None = None,
    where: tree_lib.Where = None,
    index_bits: int | None = None,
    raw_dtype: Any = None,
    centroid_dtype: Any = None,
    metadata: Mapping[str, Any] | None = None,
) -> int:
    r"""Write a parameter pytree to a compressed archive, atomically.

    Each leaf is stored by one of three methods:

    * **codebook** -- leaves named in ``codebooks``: kept positions
      (``codebook.mask``) as gaps, each Huffman-coded with a filler symbol
      :math:`2^b - 1` that skips :math:`2^b - 1` positions when a gap is longer
      (:math:`b` = ``index_bits``), the codebook index of each kept weight,
      Huffman-coded, and the used centroids. ``load`` returns
      ``where(mask, centroids[indices], 0)`` in the leaf's dtype, i.e.
      ``codebook_weights(codebook, leaf.dtype)`` (the leaf's own values are not
      read); centroids are stored in the narrowest of float16, float32 and
      float64 that holds their values in the leaf's dtype exactly.
    * **sparse** -- other leaves selected by ``where``: positions of the
      nonzero entries as above and their raw values, if smaller than raw.
    * **raw** -- everything else, little-endian; unselected floating leaves
      are cast to ``raw_dtype`` if given (lossy).

    The file is written by :func:`write_atomic`, so readers never see a
    partial archive.

    Args:
      path: destination file.
      params: a pytree of arrays: nested dicts / lists / tuples, Linen
        ``{'params': ...}`` dicts, or an NNX ``nnx.State`` (stored as its
        pure dict). Dict keys must be ``str`` or ``int``.
      codebooks: mapping from leaf name (as :func:`jaxopt_nn.tree.path_name`,
        e.g. ``'fc1/kernel'``) to its :class:`~jaxopt_nn.quantization.Codebook`.
      where: which leaves without a codebook may be stored sparse (see
        :func:`jaxopt_nn.tree.select`; default: kernels). The others are raw.
      index_bits: width :math:`b` of a relative index, in [1, 16]; ``None``
        picks, per tensor, the width giving the smallest position stream.
      raw_dtype: float type for unselected floating leaves (e.g.
        ``'float16'`` for biases); ``None`` keeps their dtype (lossless).
      centroid_dtype: ``'float16'``, ``'float32'`` or ``'float64'`` to force
        the centroid storage type (lossy if narrower than needed); ``None``
        stores them losslessly: ``load`` returns exactly
        ``where(mask, centroids[indices], 0)`` computed in the leaf's dtype.
      metadata: optional JSON-serialisable dict kept in the header (e.g. the
        model's name); read back by :func:`inspect` as ``info.metadata``.

    Returns:
      The number of bytes written.

    Raises:
      ValueError: on out-of-range options, codebook names that are not
        leaves, or codebooks whose shapes or indices do not fit their leaf.
      TypeError: on leaves that are not arrays of a supported dtype.
      OSError: if the file cannot be written (naming ``path``).
    """
    data = dumps(
        params,
        codebooks=codebooks,
        where=where,
        index_bits=index_bits,
        raw_dtype=raw_dtype,
        centroid_dtype=centroid_dtype,
        metadata=metadata,
    )
    return write_atomic(path, data)


def _naming(err: OSError, path: str) -> OSError:
    """``err`` naming ``path`` instead of the temporary file (same errno, same subclass)."""
    return err if err.errno is None else OSError(err.errno, err.strerror, path)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable; skipped where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> int:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    Readers see the old file or the new one, never a partial write; on any
    error the temporary file is removed and ``path`` is left as it was. The
    temporary file is written next to the destination, fsynced, moved over
    it, and the directory is fsynced (where the platform can open one). A
    symlink at ``path`` stays a symlink: its target is replaced. A replaced
    file keeps its permission bits; a new one gets ``0o666`` less the umask,
    as ``open`` would give it.

    Args:
      path: destination file.
      data: the bytes to write (any bytes-like object).

    Returns:
      The number of bytes written.

    Raises:
      OSError: the subclass for the failure (e.g. ``FileNotFoundError`` when
        the directory does not exist), with ``filename`` set to ``path``.
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    directory, base = os.path.split(target)
    try:
        status = os.stat(target)
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise _naming(err, path) from None
    else:
        mode = stat.S_IMODE(status.st_mode) if stat.S_ISREG(status.st_mode) else None
    # O_EXCL with mode 0o666 lets the kernel apply the umask (and default ACLs);
    # 64 random bits make a clash with an existing name practically impossible.
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(tmp, flags, 0o666)
    except OSError as err:
        raise _naming(err, path) from None
    try:
        with os.fdopen(fd, "wb") as file:
            if mode is not None:
                os.chmod(tmp, mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
        _fsync_directory(directory)
    except BaseException as err:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _naming(err, path) from None
        raise
    return len(data)


def _parse(data: bytes, *, materialize: bool) -> tuple[Any, list[np.ndarray | None], ArchiveInfo]:
    data = bytes(data)
    if len(data) <= len(MAGIC) and MAGIC.startswith(data):
        raise ArchiveError(f"truncated archive: {len(data)} bytes")
    if data[: len(MAGIC)] != MAGIC:
        raise ArchiveError(
            f"not a jaxopt_nn archive: expected magic {MAGIC!r}, got {data[: len(MAGIC)]!r}"
        )
    if data[len(MAGIC)] != VERSION:
        raise ArchiveError(
            f"unsupported archive format version {data[len(MAGIC)]}; "
            f"this reader supports version {VERSION}"
        )
    reader = _Reader(data[len(MAGIC) + 1 :], "archive header")
    try:
        compressed = reader.read(reader.varint())
        unpacker = zlib.decompressobj(-15, zdict=HEADER_DICTIONARY)
        text = unpacker.decompress(compressed, _MAX_HEADER)
        if not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
            raise ArchiveError("archive header: compressed JSON is truncated or has trailing data")
        leaves: list = []
        document, metadata = json.loads(text, object_pairs_hook=_unique_object), None
        if isinstance(document, dict) and set(document) == {_META_KEY, _TREE_KEY}:
            metadata, document = document[_META_KEY], document[_TREE_KEY]
            if not isinstance(metadata, dict):
                raise ArchiveError("archive header: metadata is not a JSON object")
        skeleton = _read_tree(document, (), leaves)
    except (ArchiveError, zlib.error, ValueError, RecursionError) as err:
        if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
            raise ArchiveError(
                f"archive is corrupt or truncated: CRC32 of the file does not match ({err})"
            ) from err
        raise ArchiveError(f"archive header is malformed: {err}") from err
    start = len(MAGIC) + 1 + reader.pos
    expected = start + sum(record[2] for _, record in leaves) + 4
    if expected != len(data):
        raise ArchiveError(
            f"archive is truncated or has extra bytes: it holds {len(data)} "
            f"bytes, its header describes {expected}"
        )
    if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ArchiveError("archive is corrupt: CRC32 of the file does not match")
    arrays, infos = [], []
    for path, record in leaves:
        name = "/".join(map(str, path))
        section = data[start : start + record[2]]
        start += record[2]
        payload = section[:-4]
        if zlib.crc32(payload) != int.from_bytes(section[-4:], "little"):
            raise ArchiveError(f"tensor {name!r}: section CRC32 does not match")
        try:
            array, info = _decode_leaf(name, record, payload, materialize=materialize)
        except ArchiveError:
            raise
        except (ValueError, IndexError) as err:
            raise ArchiveError(f"tensor {name!r}: {err}") from err
        except (MemoryError, OverflowError) as err:
            needed = math.prod(record[1]) * _record_dtypes(record)[0].itemsize
            raise ArchiveError(
                f"tensor {name!r} of shape {tuple(record[1])} needs {needed:,} bytes, "
                f"more than can be allocated ({type(err).__name__})"
            ) from err
        arrays.append(array)
        infos.append(info)
    header_bytes = len(data) - sum(info.nbytes for info in infos)
    return skeleton, arrays, ArchiveInfo(infos, header_bytes, len(data), metadata)


def loads(data: bytes) -> PyTree:
    """Parameters from archive bytes (see :func:`load`)."""
    skeleton, arrays, _ = _parse(data, materialize=True)
    return _fill(skeleton, arrays)


def load(path: str | os.PathLike) -> PyTree:
    """Read an archive written by :func:`save`.

    Args:
      path: the archive file.

    Returns:
      The parameters as nested ``dict`` / ``list`` of NumPy arrays, with the
      saved shapes, dtypes and keys (``str`` or ``int``); tuples come back as
      lists and an NNX state as its pure dict (restore it with
      ``nnx.replace_by_pure_dict``). Values are bit-exact, except leaves cast
      by ``raw_dtype`` or ``centroid_dtype``.

    Raises:
      ArchiveError: if the file is not an archive, has an unknown version, is
        truncated, fails a CRC32 or consistency check, exceeds a reader limit
        (e.g. more than :data:`MAX_ELEMENTS` elements in a tensor; see
        ``docs/archive-format.md``), or holds a tensor too large to allocate.
    """
    with open(path, "rb") as file:
        return loads(file.read())


def inspect(source: str | os.PathLike | bytes) -> ArchiveInfo:
    """Per-tensor storage and byte accounting of an archive (a path or its bytes).

    The bytes of the tensors' sections plus ``header_bytes`` equal the file
    size; ``ArchiveInfo.table()`` prints them Deep-Compression style. Every
    check of :func:`load` runs, but no dense tensor is built, so the memory
    used grows with the file's size, not with the tensors' shapes.

    Raises:
      ArchiveError: as :func:`load`.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)):
        with open(source, "rb") as file:
            source = file.read()
    return _parse(source, materialize=False)[2]
