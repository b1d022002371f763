"""Compressed, checksummed archive of a parameter pytree (Deep Compression storage).

A tensor given a :class:`~jaxopt_nn.quantization.Codebook` is stored as the
positions of its kept weights (relative indices: gaps, with a filler symbol
when a gap is too long for the index width; or a bitmap), the codebook index
of each kept weight, and the used centroids. Each symbol stream is
Huffman-coded or packed at a fixed width, whichever is smaller. Other selected tensors are
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
VERSION = 2  # 2 adds bitmap positions and fixed-width streams; version 1 files still load
_VERSIONS = (1, 2)
_MAX_LENGTH = 15  # code length limit while <= 2**15 symbols are used (4-bit table entries)
_MAX_INDEX_BITS = 16
# Reader limits (docs/archive-format.md, "What a reader accepts"); the writer keeps to them too.
MAX_HEADER_BYTES = 1 << 24  # bytes of inflated header JSON
MAX_HEADER_NODES = 1 << 18  # JSON values and keys in the header ...
_HEADER_NODE_FLOOR, _HEADER_NODES_PER_BYTE = 1 << 16, 64  # ... and at most 2**16 + 64 per byte
MAX_DEPTH = 64  # nesting of the tree and of the metadata
MAX_NDIM = 64  # dimensions of a tensor the reader accepts (NumPy's limit)
MAX_ELEMENTS = 1 << 40  # elements of a tensor (and size of any one dimension) the reader accepts
DEFAULT_MAX_BYTES = 1 << 32  # default bound on the bytes of all loaded leaves together
_MIN_INT_KEY, _MAX_INT_KEY = -(1 << 31), 1 << 31  # integer dict keys: int32
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
_RAW_FLOAT_CODES = {"f2", "bfloat16", "f4", "f8"}  # raw_dtype choices; codebook leaf dtypes
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
    position_coding: str = ""  # 'huffman', 'fixed' or 'bitmap'; '' for raw
    value_coding: str = "raw"  # 'huffman' or 'fixed' for a codebook; 'raw' otherwise


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
        """Per-tensor table (Deep Compression style); the bytes column sums to the file size.

        Names are passed through :func:`printable`, so a crafted name cannot
        move the cursor or forge rows on a terminal.
        """
        rows = [
            [
                printable(t.name),
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


def printable(text: str) -> str:
    r"""``text`` with every non-printable character escaped as ``repr`` writes it.

    Names and metadata come from the file, so anything printed from them goes
    through here: terminal escape sequences, line breaks and bidirectional
    overrides are shown, not obeyed.

    Example:
      >>> print(printable('fc1/kernel'), printable('a\x1b[2Jb\n'))
      fc1/kernel a\x1b[2Jb\n
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ----------------------------------------------------------------------------- bytes


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


class _Reader:
    """Bounded reads from a section; running past its end is an ArchiveError."""

    def __init__(self, data: bytes, what: str, pos: int = 0):
        self.data, self.pos, self.what = data, pos, what

    def read(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArchiveError(
                f"{self.what}: needs {n} more bytes at offset {self.pos}, "
                f"only {len(self.data) - self.pos} left (inconsistent lengths)"
            )
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def varint(self) -> int:
        """An unsigned LEB128 integer below 2**63, in its shortest form (as written)."""
        value = 0
        for shift in range(0, 63, 7):
            byte = self.read(1)[0]
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if shift and not byte:
                    break
                return value
        raise ArchiveError(
            f"{self.what}: malformed variable-length integer at offset {self.pos} "
            "(over 9 bytes, or not in its shortest form)"
        )


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    bits = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def _unpack_bits(data: bytes, count: int, width: int) -> np.ndarray:
    """``count`` unsigned ``width``-bit fields (``width <= 16``), most significant bit first."""
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=count * width).reshape(count, width)
    packed = np.packbits(bits, axis=1)  # ceil(width / 8) bytes per field, left-aligned
    if width <= 8:
        return packed.reshape(count) >> (8 - width)
    return (packed[:, 0].astype(np.uint16) << 8 | packed[:, 1]) >> (16 - width)


def _check_padding(data: bytes, bits: int, what: str) -> None:
    """The bits of ``data`` after the first ``bits`` are zero (as the writer pads)."""
    if bits % 8 and data[-1] & ((1 << (-bits % 8)) - 1):
        raise ArchiveError(f"{what}: padding bits must be zero")


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


def _fixed_width(counts: np.ndarray) -> int:
    """Bits per symbol of the fixed-width form: the width of the largest symbol (at least 1)."""
    return max(1, (int(np.flatnonzero(counts)[-1]) if counts.any() else 0).bit_length())


def _fixed_bytes(counts: np.ndarray) -> int:
    """Size of the fixed-width form: count, a zero table size, the width, the packed symbols."""
    count = int(counts.sum())
    return len(_varint_bytes(count)) + 2 + -(-count * _fixed_width(counts) // 8)


def _stream_bytes(counts: np.ndarray) -> int:
    """Exact size of the stream :func:`_write_stream` makes for symbols with these counts."""
    count = int(counts.sum())
    return min(_huffman_bytes(counts), _fixed_bytes(counts)) if count else 1


def _huffman_bytes(counts: np.ndarray) -> int:
    """Size of the Huffman form of a stream with these symbol counts."""
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
    """Huffman (count, code-length table, chunk bit lengths, bit count, codewords) or,
    when smaller, fixed width (count, a zero table size, the width, the packed symbols)."""
    _put_varint(out, symbols.size)
    if not symbols.size:
        return
    counts = np.bincount(symbols, minlength=num_symbols)
    if _fixed_bytes(counts) < _huffman_bytes(counts):
        width = _fixed_width(counts)
        out += b"\x00" + bytes([width]) + _pack_bits(symbols, width)
        return
    lengths = _stream_lengths(counts)
    width = int(lengths.max()).bit_length()
    _put_varint(out, lengths.size)
    out.append(width)
    out += _pack_bits(lengths.astype(np.int64), width)
    stream = huffman.encode(symbols, lengths, chunk_size=_chunk_size(symbols.size))
    out += np.diff(stream.chunk_offsets).astype(_chunk_dtype(lengths)).tobytes()
    _put_varint(out, stream.num_bits)
    out += stream.data


class _Stream(NamedTuple):
    """A Huffman stream located and checked in a section, not yet decoded.

    Fixed-width streams and bitmaps are decoded as they are read: a section's
    ``streams`` holds their symbols (an array) in place of a ``_Stream``.
    """

    encoded: huffman.EncodedStream
    lengths: np.ndarray  # code lengths, shape (T,)
    symbol_count: int
    what: str  # names the stream in error messages


def _read_stream(
    reader: _Reader, num_symbols: int | None, what: str, version: int
) -> tuple[_Stream | np.ndarray, int]:
    """Locate and check a stream written by :func:`_write_stream`, and its payload bits.

    A Huffman stream is decoded later; a fixed-width one now (its symbols are
    returned). ``num_symbols`` is the alphabet size; ``None`` for a value
    stream, whose alphabet (the used centroids) is at most its symbol count.
    """
    what = f"{reader.what}: {what}"
    count = reader.varint()
    if not count:
        empty = huffman.EncodedStream(b"", 0, np.zeros(0, np.int64), 1)
        return _Stream(empty, np.zeros(0, np.uint8), 0, what), 0
    num_symbols = count if num_symbols is None else num_symbols
    table_size = reader.varint()
    if not table_size and version >= 2:
        return _read_fixed(reader, count, num_symbols, what)
    if not 1 <= table_size <= num_symbols:
        raise ArchiveError(
            f"{what}: code table of {table_size} symbols, alphabet has {num_symbols}"
        )
    width = reader.read(1)[0]
    if not 1 <= width <= 5:
        raise ArchiveError(f"{what}: code-length width {width} not in [1, 5]")
    table = reader.read(-(-table_size * width // 8))
    lengths = _unpack_bits(table, table_size, width)
    _check_code(lengths, table, width, what)
    chunk_dtype = np.dtype(_chunk_dtype(lengths))
    chunk_size = _chunk_size(count)
    chunk_bits = np.frombuffer(
        reader.read((-(-count // chunk_size) - 1) * chunk_dtype.itemsize), chunk_dtype
    )
    num_bits = reader.varint()
    if count > num_bits:
        raise ArchiveError(f"{what}: {count} symbols cannot fit {num_bits} bits")
    data = reader.read((num_bits + 7) // 8)
    offsets = np.concatenate([[0], np.cumsum(chunk_bits, dtype=np.int64)])
    encoded = huffman.EncodedStream(data, num_bits, offsets, chunk_size)
    return _Stream(encoded, lengths, count, what), num_bits


def _read_fixed(reader: _Reader, count: int, num_symbols: int, what: str) -> tuple[np.ndarray, int]:
    """Symbols and payload bits of a fixed-width stream (after its zero table size): the
    width byte, then the packed fields.

    Its bytes are read before anything is allocated, so a declared ``count``
    costs what the file holds.
    """
    width = reader.read(1)[0]
    if not 1 <= width <= _MAX_INDEX_BITS:
        raise ArchiveError(f"{what}: fixed width {width} not in [1, {_MAX_INDEX_BITS}]")
    data = reader.read(-(-count * width // 8))
    _check_padding(data, count * width, what)
    symbols = _unpack_bits(data, count, width)
    top = int(symbols.max())
    if max(1, top.bit_length()) != width:
        raise ArchiveError(
            f"{what}: fixed width {width} is not the width of its largest symbol {top}"
        )
    if top >= num_symbols:
        raise ArchiveError(f"{what}: symbol {top} outside an alphabet of {num_symbols}")
    return symbols, count * width


def _read_bitmap(reader: _Reader, size: int) -> np.ndarray:
    """Keep-mask of a bitmap position stream: ``ceil(size / 8)`` bytes, zero padding."""
    data = reader.read(-(-size // 8))
    _check_padding(data, size, f"{reader.what}: position bitmap")
    return np.unpackbits(np.frombuffer(data, np.uint8), count=size).view(np.bool_)


def _check_code(lengths: np.ndarray, table: bytes, width: int, what: str) -> None:
    """The code-length table is one the writer makes: optimal codes are complete."""
    if table[-1] & ((1 << (-len(lengths) * width % 8)) - 1):
        raise ArchiveError(f"{what}: code-length table padding bits must be zero")
    if not lengths[-1]:
        raise ArchiveError(f"{what}: code table ends with an unused symbol")
    used = int(np.count_nonzero(lengths))
    longest = int(lengths.max())
    if longest > _length_limit(used):
        raise ArchiveError(
            f"{what}: code length {longest} exceeds {_length_limit(used)} bits, "
            f"the limit for {used} coded symbols"
        )
    if longest > huffman.MAX_CODE_LENGTH:
        raise ArchiveError(f"{what}: code length {longest} above {huffman.MAX_CODE_LENGTH} bits")
    kraft = int(np.sum(np.left_shift(1, longest - lengths[lengths > 0].astype(np.int64))))
    if (used == 1 and longest != 1) or (used > 1 and kraft != 1 << longest):
        raise ArchiveError(
            f"{what}: code lengths are not those of an optimal (complete) prefix code"
        )


def _decode_streams(streams: list[_Stream]) -> list[np.ndarray]:
    """Decode every stream of the archive at once (see :func:`huffman.decode_streams`)."""
    try:
        return huffman.decode_streams(
            [s.encoded for s in streams],
            [s.lengths for s in streams],
            [s.symbol_count for s in streams],
            names=[s.what for s in streams],
        )
    except ValueError as err:
        raise ArchiveError(str(err)) from None


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


def _best_index_bits(positions: np.ndarray, size: int) -> int:
    """Position coding whose stream is smallest: an index width, or 0 for a bitmap of
    ``size`` bits (ties: relative indices, then the narrower width)."""
    gaps = np.diff(positions, prepend=-1) - 1
    widest = min(_MAX_INDEX_BITS, int(gaps.max(initial=0) + 1).bit_length())
    sizes = [_stream_bytes(_gap_counts(gaps, bits)) for bits in range(1, widest + 1)]
    best = int(np.argmin(sizes))
    return 0 if -(-size // 8) < sizes[best] else 1 + best


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


def _encode_positions(
    out: bytearray, positions: np.ndarray, size: int, index_bits: int | None
) -> None:
    bits = _best_index_bits(positions, size) if index_bits is None else index_bits
    out.append(bits)
    if bits:
        _write_stream(out, _gap_symbols(positions, bits), 1 << bits)
        return
    bitmap = np.zeros(size, np.uint8)
    bitmap[positions] = 1
    out += np.packbits(bitmap).tobytes()


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
    with np.errstate(over="ignore", invalid="ignore"):
        values = centroids.astype(leaf.dtype)[used]  # what codebook_weights(..., dtype) holds
    if not np.isfinite(values.astype(np.float64)).all():
        raise ValueError(
            f"codebook for {name!r} uses centroids that are not finite in {leaf.dtype}"
        )
    if centroid_dtype is None:  # the narrowest type that holds every value bit-exactly
        bits = f"u{leaf.dtype.itemsize}"
        centroid_dtype = next(
            dtype
            for dtype in _CENTROID_DTYPES.values()
            if np.array_equal(values.astype(dtype).astype(leaf.dtype).view(bits), values.view(bits))
        )
    with np.errstate(over="ignore"):
        stored = values.astype(np.dtype(centroid_dtype).newbyteorder("<"))
    if not np.isfinite(stored).all():
        raise ValueError(
            f"codebook for {name!r} has centroids that overflow centroid_dtype={centroid_dtype}"
        )
    out = bytearray()
    _encode_positions(out, positions, leaf.size, index_bits)
    _write_stream(out, np.searchsorted(used, kept), used.size)
    out += _CENTROID_TAGS[centroid_dtype]
    out += stored.tobytes()
    return bytes(out)


def _encode_sparse(flat: np.ndarray, index_bits: int | None) -> bytes:
    positions = _nonzero_bits(flat)
    out = bytearray()
    _encode_positions(out, positions, flat.size, index_bits)
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
    if not isinstance(value, str) and not _MIN_INT_KEY <= value < _MAX_INT_KEY:
        raise ValueError(
            f"leaf {name!r}: integer dict keys must lie in [-2**31, 2**31); got {value!r}"
        )
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


def _is_empty(node: Any) -> bool:
    """``None`` or an empty container: kept in the header (``null``, ``{}``, ``[]``)."""
    return node is None or (isinstance(node, (Mapping, list, tuple)) and not node)


def _empty_json(node: Any) -> Any:
    return None if node is None else {} if isinstance(node, Mapping) else []


def _header_tree(paths: list[tuple], records: list[Any]) -> Any:
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
    # None and empty containers are kept as header nodes; arrays are the leaves.
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_empty)
    arrays = [(path, leaf) for path, leaf in flat if not _is_empty(leaf)]
    names = [tree_lib.path_name(path) for path, _ in arrays]
    unknown = sorted(set(codebooks) - set(names))
    if unknown:
        raise ValueError(f"codebooks names {unknown} are not leaves of params; leaves: {names}")
    flags = iter(jax.tree.leaves(tree_lib.select(params, where)))
    records, sections = [], bytearray()
    for path, leaf in flat:
        if _is_empty(leaf):
            records.append(_empty_json(leaf))
            continue
        name = tree_lib.path_name(path)
        record, payload = _encode_leaf(
            name, _as_array(leaf, name), next(flags), codebooks.get(name), options
        )
        records.append(record)
        sections += payload + zlib.crc32(payload).to_bytes(4, "little")
    header = _header_tree([_strip_variable(path) for path, _ in flat], records)
    if metadata is not None:
        header = {_META_KEY: metadata, _TREE_KEY: header}
    text = json.dumps(header, separators=(",", ":")).encode()
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, HEADER_DICTIONARY)
    compressed = packer.compress(text) + packer.flush()
    try:  # never write what the reader refuses
        if len(text) > MAX_HEADER_BYTES:
            raise ArchiveError(f"the header would take {len(text):,} bytes of JSON")
        _check_header_size(text, len(compressed))
        _read_document(header)
    except ArchiveError as err:
        raise ValueError(f"params and metadata exceed the archive reader's limits: {err}") from None
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
        pure dict). Dict keys must be ``str`` or ``int`` in
        ``[-2**31, 2**31)``; ``None`` and empty containers are kept.
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
        leaves, codebooks whose shapes or indices do not fit their leaf or
        whose used centroids are not finite (in the leaf's dtype and in
        ``centroid_dtype``), or a tree or metadata beyond the reader's limits
        (too deep, too many header values, integer keys out of range).
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


# ----------------------------------------------------------------------------- reader
#
# Every check a reader makes lives below, in the order it runs: header size
# and shape (_inflate_header, _check_header_size, _read_document), records
# (_check_record), the decoded size (_check_decoded_size), sections
# (_scan_section, _read_stream, _check_code), then values (_finish_section).
# A new stream coding or stored dtype adds its case to these functions.


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _inflate_header(compressed: bytes) -> bytes:
    unpacker = zlib.decompressobj(-15, zdict=HEADER_DICTIONARY)
    text = unpacker.decompress(compressed, MAX_HEADER_BYTES + 1)
    if len(text) > MAX_HEADER_BYTES:
        raise ArchiveError(
            f"archive header inflates to more than {MAX_HEADER_BYTES:,} bytes, "
            "the reader's limit (MAX_HEADER_BYTES)"
        )
    if not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
        raise ArchiveError("archive header: compressed JSON is truncated or has trailing data")
    return text


def _header_node_limit(compressed_bytes: int) -> int:
    return min(MAX_HEADER_NODES, _HEADER_NODE_FLOOR + _HEADER_NODES_PER_BYTE * compressed_bytes)


def _check_header_size(text: bytes, compressed_bytes: int) -> None:
    """Bound the JSON values the header can hold before parsing it.

    Every value or key but the first follows a ``,``, ``:``, ``[`` or ``{``,
    so counting those (also inside strings) bounds the objects ``json``
    builds, in one pass over the text.
    """
    nodes = 1 + sum(text.count(c) for c in (b",", b":", b"[", b"{"))
    limit = _header_node_limit(compressed_bytes)
    if nodes > limit:
        raise ArchiveError(
            f"archive header may hold {nodes:,} JSON values; this reader accepts at most "
            f"{limit:,} for {compressed_bytes:,} compressed bytes (min({MAX_HEADER_NODES:,}, "
            f"{_HEADER_NODE_FLOOR:,} + {_HEADER_NODES_PER_BYTE} per compressed byte))"
        )


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing duplicate keys (``json`` would keep the last silently)."""
    obj = dict(pairs)  # str keys: hashes are salted per process, so this is linear
    if len(obj) != len(pairs):
        _raise_duplicate([k for k, _ in pairs], "a JSON object")
    return obj


def _raise_duplicate(keys: list, where: str) -> None:
    seen: set = set()
    for key in keys:
        if key in seen:
            raise ArchiveError(f"header: key {key!r:.80} appears twice in {where}")
        seen.add(key)


def _check_depth(node: Any, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise ArchiveError(f"header: {where} nests deeper than {MAX_DEPTH} levels")
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        _check_depth(child, depth + 1, where)


def _read_document(document: Any) -> tuple[Any, list[tuple[tuple, list]], dict | None]:
    """(skeleton, [(path, record)], metadata) of a parsed header; checks everything in it."""
    metadata = None
    if isinstance(document, dict) and set(document) == {_META_KEY, _TREE_KEY}:
        metadata, document = document[_META_KEY], document[_TREE_KEY]
        if not isinstance(metadata, dict):
            raise ArchiveError("archive header: metadata is not a JSON object")
        _check_depth(metadata, 1, "the metadata")
    leaves: list = []
    return _read_tree(document, (), leaves, 0), leaves, metadata


def _read_tree(node: Any, path: tuple, leaves: list, depth: int) -> Any:
    """Rebuild the tree with placeholders (leaf indices); collect (path, record) in order."""
    if depth > MAX_DEPTH:
        raise ArchiveError(f"header: the tree nests deeper than {MAX_DEPTH} levels")
    if node is None:
        return None
    if isinstance(node, list) and node and isinstance(node[0], str):
        _check_record(node, _name(path))
        leaves.append((path, node))
        return len(leaves) - 1
    if isinstance(node, list):
        return [_read_tree(child, (*path, i), leaves, depth + 1) for i, child in enumerate(node)]
    if isinstance(node, dict) and set(node) == {"#"} and isinstance(node["#"], list):
        items = node["#"]
        for item in items:
            if not (
                isinstance(item, list)
                and len(item) == 2
                and (
                    isinstance(item[0], str)
                    or (type(item[0]) is int and _MIN_INT_KEY <= item[0] < _MAX_INT_KEY)
                )
            ):
                raise ArchiveError(
                    f"header: malformed mapping entry {item!r:.80} at {_name(path)!r:.80}; "
                    f"keys are strings or integers in [-2**31, 2**31)"
                )
        # Integer keys are bounded, so their hashes are distinct: building the dict is linear.
        tree = {k: _read_tree(v, (*path, k), leaves, depth + 1) for k, v in items}
        if len(tree) != len(items):
            _raise_duplicate([k for k, _ in items], f"the mapping at {_name(path)!r:.80}")
        return tree
    if isinstance(node, dict):
        return {k: _read_tree(v, (*path, k), leaves, depth + 1) for k, v in node.items()}
    raise ArchiveError(f"header: unexpected node {node!r:.40} at {_name(path)!r:.80}")


def _check_record(record: list, name: str) -> None:
    ok = (
        3 <= len(record) <= 5
        and record[0] in _METHODS
        and isinstance(record[1], list)
        and all(type(d) is int and d >= 0 for d in record[1])
        and type(record[2]) is int
        and record[2] >= 4
        and all(isinstance(c, str) and c in _DTYPES for c in record[3:])
    )
    if not ok:
        raise ArchiveError(f"header: malformed record for tensor {name!r:.80}: {record!r:.80}")
    method, shape, _, *codes = record
    if len(shape) > MAX_NDIM:
        raise ArchiveError(
            f"header: tensor {name!r:.80} has {len(shape)} dimensions; "
            f"this reader accepts at most {MAX_NDIM}"
        )
    if max(shape, default=0) > MAX_ELEMENTS or math.prod(shape) > MAX_ELEMENTS:
        raise ArchiveError(
            f"header: tensor {name!r:.80} has shape {shape!r:.80}; this reader accepts at most "
            f"2**{MAX_ELEMENTS.bit_length() - 1} elements (and as many per dimension)"
        )
    # One encoding per value: the dtype fields are present exactly when the writer writes them.
    if codes == ["f4"] or (
        len(codes) == 2
        and (method != "r" or codes[0] == codes[1] or not set(codes) <= _RAW_FLOAT_CODES)
    ):
        raise ArchiveError(
            f"header: tensor {name!r:.80} has dtype fields {codes}, which the writer never "
            "writes: 'f4' is implied, and a stored dtype differs from the dtype only for "
            "raw float leaves (both of f2, bfloat16, f4, f8)"
        )
    if method == "q" and codes and codes[0] not in _RAW_FLOAT_CODES:
        raise ArchiveError(
            f"header: codebook tensor {name!r:.80} has dtype {codes[0]}; codebook leaves are "
            "floating (f2, bfloat16, f4, f8)"
        )


def _check_decoded_size(leaves: list[tuple[tuple, list]], max_bytes: int | None) -> None:
    if max_bytes is None:
        return
    total = sum(math.prod(record[1]) * _record_dtypes(record)[0].itemsize for _, record in leaves)
    if total > max_bytes:
        raise ArchiveError(
            f"archive decodes to {total:,} bytes, more than max_bytes={max_bytes:,} "
            "(pass a larger max_bytes, or None, to read it)"
        )


def _check_max_bytes(max_bytes: Any) -> None:
    if max_bytes is not None and (
        isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0
    ):
        raise ValueError(
            f"max_bytes must be None or a non-negative integer; got max_bytes={max_bytes!r}"
        )


class _Section(NamedTuple):
    """A tensor's section, located and checked; its streams are decoded later, all at once."""

    name: str
    record: list
    index_bits: int  # width of a relative index; 0 for raw and bitmap positions
    streams: list[_Stream | np.ndarray]  # positions, then a codebook's values (see _Stream)
    stream_bits: list[int]  # payload bits of each stream
    values: bytes  # raw: every value; sparse: the kept values; codebook: the centroids
    centroid_dtype: np.dtype | None
    index_bytes: int
    value_bytes: int
    codebook_bytes: int


def _scan_section(name: str, record: list, payload: bytes, version: int) -> _Section:
    method, shape = record[0], record[1]
    dtype, stored = _record_dtypes(record)
    reader = _Reader(payload, f"tensor {name!r:.80}")
    index_bits = index_bytes = value_bytes = codebook_bytes = 0
    streams, stream_bits, centroid_dtype = [], [], None
    if method == "r":
        values = reader.read(math.prod(shape) * stored.itemsize)
        value_bytes = reader.pos
    else:
        index_bits = reader.read(1)[0]
        lowest = 0 if version >= 2 else 1  # 0, a bitmap, since version 2
        if not lowest <= index_bits <= _MAX_INDEX_BITS:
            raise ArchiveError(
                f"{reader.what}: index width {index_bits} not in [{lowest}, {_MAX_INDEX_BITS}]"
            )
        if index_bits:
            stream, bits = _read_stream(reader, 1 << index_bits, "position stream", version)
        else:
            stream, bits = _read_bitmap(reader, math.prod(shape)), math.prod(shape)
        streams.append(stream)
        stream_bits.append(bits)
        index_bytes = reader.pos
        item = dtype
        if method == "q":
            stream, bits = _read_stream(reader, None, "value stream", version)
            streams.append(stream)
            stream_bits.append(bits)
            value_bytes = reader.pos - index_bytes
            tag = reader.read(1)
            if tag not in _CENTROID_DTYPES:
                raise ArchiveError(f"{reader.what}: unknown centroid dtype tag {tag!r}")
            item = centroid_dtype = _CENTROID_DTYPES[tag]
        rest = len(payload) - reader.pos
        if rest % item.itemsize:
            raise ArchiveError(
                f"{reader.what}: {rest} bytes of values are not a whole number of {item} values"
            )
        values = reader.read(rest)
        if method == "q":
            codebook_bytes = len(payload) - index_bytes - value_bytes
            ranks = streams[1]
            table = ranks.lengths.size if isinstance(ranks, _Stream) else int(ranks.max()) + 1
            if rest // item.itemsize != table:
                raise ArchiveError(
                    f"{reader.what}: {rest // item.itemsize} centroids for a value code "
                    f"of {table} symbols (inconsistent lengths)"
                )
        else:
            value_bytes = rest
    if reader.pos != len(payload):
        raise ArchiveError(
            f"{reader.what}: {len(payload) - reader.pos} unexpected bytes at "
            "the end of its section (inconsistent lengths)"
        )
    return _Section(
        name,
        record,
        index_bits,
        streams,
        stream_bits,
        values,
        centroid_dtype,
        index_bytes,
        value_bytes,
        codebook_bytes,
    )


def _positions(symbols: np.ndarray, index_bits: int, size: int, what: str) -> np.ndarray:
    """Kept positions from relative indices (fillers advance by 2**bits - 1).

    The last position is computed first (in int64, without a temporary), so
    the running sum runs in int32 whenever the tensor allows it.
    """
    filler = (1 << index_bits) - 1
    if symbols.size and symbols[-1] == filler:
        raise ArchiveError(f"{what}: position stream ends with a filler symbol")
    is_filler = symbols == filler
    fillers = int(np.count_nonzero(is_filler))
    end = int(symbols.sum(dtype=np.int64)) + symbols.size - fillers  # last position + 1
    if symbols.size and end > size:
        raise ArchiveError(f"{what}: kept position {end - 1} outside a tensor of {size}")
    ends = symbols.astype(np.int32 if end < 2**31 else np.int64)
    ends += 1
    if fillers:
        ends[is_filler] = filler
    np.cumsum(ends, out=ends)
    ends -= 1
    return ends[~is_filler] if fillers else ends


def _codings(section: _Section) -> tuple[str, str]:
    """(position coding, value coding) of a section, as :class:`TensorInfo` names them."""
    if not section.streams:
        return "", "raw"
    names = ["huffman" if isinstance(s, _Stream) else "fixed" for s in section.streams]
    if not section.index_bits:
        names[0] = "bitmap"
    return names[0], names[1] if len(names) > 1 else "raw"


def _finish_section(
    section: _Section, symbols: list[np.ndarray], *, materialize: bool
) -> tuple[np.ndarray | None, TensorInfo]:
    """Check the decoded values; build the dense leaf only if ``materialize``."""
    name, record = section.name, section.record
    method, shape = record[0], tuple(record[1])
    dtype, stored = _record_dtypes(record)
    size = math.prod(shape)
    what = f"tensor {name!r:.80}"
    index_bits = weight_bits = 0.0
    positions = values = None
    if method == "r":
        values = np.frombuffer(section.values, stored.newbyteorder("<"))
        kept, weight_bits = size, 8.0 * stored.itemsize
        if dtype == np.bool_ and values.view(np.uint8).max(initial=0) > 1:
            raise ArchiveError(f"{what}: a bool byte other than 0 or 1")
    else:
        if section.index_bits:
            positions = _positions(symbols[0], section.index_bits, size, what)
            kept = positions.size
        else:  # a bitmap: the keep-mask itself indexes the leaf
            positions = symbols[0]
            kept = int(np.count_nonzero(positions))
        index_bits = section.stream_bits[0] / max(kept, 1)
        if method == "q":
            ranks = symbols[1]
            if ranks.size != kept:
                raise ArchiveError(
                    f"{what}: {ranks.size} codebook indices for {kept} kept positions "
                    "(inconsistent lengths)"
                )
            assert section.centroid_dtype is not None
            centroids = np.frombuffer(section.values, section.centroid_dtype.newbyteorder("<"))
            with np.errstate(over="ignore"):
                cast = centroids.astype(dtype)
            if not (np.isfinite(centroids).all() and np.isfinite(cast.astype(np.float64)).all()):
                raise ArchiveError(f"{what}: a centroid is not finite in {dtype}")
            if kept and np.bincount(ranks, minlength=centroids.size).min() == 0:
                raise ArchiveError(f"{what}: a stored centroid is used by no weight")
            values = cast[ranks]
            weight_bits = section.stream_bits[1] / max(kept, 1)
        else:
            values = np.frombuffer(section.values, dtype.newbyteorder("<"))
            if values.size != kept:
                raise ArchiveError(
                    f"{what}: {values.size} values for {kept} kept positions (inconsistent lengths)"
                )
            bits = values.view(f"u{dtype.itemsize}")
            if kept and (bits.min() == 0 or (dtype == np.bool_ and bits.max() > 1)):
                raise ArchiveError(
                    f"{what}: a kept value is zero"
                    + (" or a bool byte above 1" * (dtype == np.bool_))
                )
            weight_bits = 8.0 * dtype.itemsize
    info = TensorInfo(
        name,
        shape,
        dtype.name,
        _METHODS[method],
        size,
        kept,
        weight_bits,
        index_bits,
        section.index_bytes,
        section.value_bytes,
        section.codebook_bytes,
        record[2],
        *_codings(section),
    )
    if not materialize:
        return None, info
    if positions is None:
        return values.astype(dtype).reshape(shape), info
    flat = np.zeros(size, dtype)
    flat[positions] = values
    return flat.reshape(shape), info


def _parse(
    data: bytes, *, materialize: bool, max_bytes: int | None
) -> tuple[Any, list[np.ndarray | None], ArchiveInfo]:
    _check_max_bytes(max_bytes)
    data = bytes(data)
    if len(data) <= len(MAGIC) and MAGIC.startswith(data):
        raise ArchiveError(f"truncated archive: {len(data)} bytes")
    if data[: len(MAGIC)] != MAGIC:
        raise ArchiveError(
            f"not a jaxopt_nn archive: expected magic {MAGIC!r}, got {data[: len(MAGIC)]!r}"
        )
    version = data[len(MAGIC)]
    if version not in _VERSIONS:
        raise ArchiveError(
            f"unsupported archive format version {version}; this reader supports "
            f"versions {', '.join(map(str, _VERSIONS))}"
        )
    reader = _Reader(data, "archive header", len(MAGIC) + 1)
    try:
        compressed = reader.read(reader.varint())
        text = _inflate_header(compressed)
        _check_header_size(text, len(compressed))
        skeleton, leaves, metadata = _read_document(
            json.loads(text, object_pairs_hook=_unique_object)
        )
    except (ArchiveError, zlib.error, ValueError, RecursionError) as err:
        if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
            raise ArchiveError(
                f"archive is corrupt or truncated: CRC32 of the file does not match ({err})"
            ) from err
        raise ArchiveError(f"archive header is malformed: {err}") from err
    _check_decoded_size(leaves, max_bytes)
    start = reader.pos
    expected = start + sum(record[2] for _, record in leaves) + 4
    if expected != len(data):
        raise ArchiveError(
            f"archive is truncated or has extra bytes: it holds {len(data)} "
            f"bytes, its header describes {expected}"
        )
    if zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ArchiveError("archive is corrupt: CRC32 of the file does not match")
    sections = []
    for path, record in leaves:
        name = _name(path)
        payload = data[start : start + record[2] - 4]
        start += record[2]
        if zlib.crc32(payload) != int.from_bytes(data[start - 4 : start], "little"):
            raise ArchiveError(f"tensor {name!r:.80}: section CRC32 does not match")
        sections.append(_scan_section(name, record, payload, version))
    pending = [s for section in sections for s in section.streams if isinstance(s, _Stream)]
    decoded = iter(_decode_streams(pending))
    arrays, infos = [], []
    for section in sections:
        symbols = [next(decoded) if isinstance(s, _Stream) else s for s in section.streams]
        try:
            array, info = _finish_section(section, symbols, materialize=materialize)
        except (MemoryError, OverflowError) as err:
            record = section.record
            needed = math.prod(record[1]) * _record_dtypes(record)[0].itemsize
            raise ArchiveError(
                f"tensor {section.name!r:.80} of shape {tuple(record[1])} needs {needed:,} "
                f"bytes, more than can be allocated ({type(err).__name__})"
            ) from err
        arrays.append(array)
        infos.append(info)
    header_bytes = len(data) - sum(info.nbytes for info in infos)
    return skeleton, arrays, ArchiveInfo(infos, header_bytes, len(data), metadata)


def _fill(node: Any, arrays: list) -> Any:
    if node is None:
        return None
    if isinstance(node, int):
        return arrays[node]
    if isinstance(node, list):
        return [_fill(child, arrays) for child in node]
    return {k: _fill(v, arrays) for k, v in node.items()}


def loads(data: bytes, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> PyTree:
    """Parameters from archive bytes (see :func:`load`)."""
    skeleton, arrays, _ = _parse(data, materialize=True, max_bytes=max_bytes)
    return _fill(skeleton, arrays)


def load(path: str | os.PathLike, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> PyTree:
    """Read an archive written by :func:`save`.

    Every byte is treated as untrusted (CRC32s catch damage, not forgery):
    the reader's time and memory grow with the file's size, declared sizes
    are checked before anything is allocated, and a value the writer would
    never write is refused (see ``docs/archive-format.md``, "What a reader
    accepts").

    Args:
      path: the archive file.
      max_bytes: the most bytes the loaded leaves may take together (their
        shapes times their itemsizes), checked from the header before any
        section is read; ``None`` for no limit. Default: 4 GiB
        (:data:`DEFAULT_MAX_BYTES`).

    Returns:
      The parameters as nested ``dict`` / ``list`` of NumPy arrays, with the
      saved shapes, dtypes and keys (``str`` or ``int``); ``None`` and empty
      containers where the tree held them; tuples come back as lists and an
      NNX state as its pure dict (restore it with
      ``nnx.replace_by_pure_dict``). Values are bit-exact, except leaves cast
      by ``raw_dtype`` or ``centroid_dtype``.

    Raises:
      ArchiveError: if the file is not an archive, has an unknown version, is
        truncated, fails a CRC32 or consistency check, exceeds a reader limit
        (e.g. more than :data:`MAX_ELEMENTS` elements in a tensor) or
        ``max_bytes``, holds an encoding the writer never produces, or holds a
        tensor too large to allocate.
      ValueError: if ``max_bytes`` is not ``None`` or a non-negative integer.
    """
    with open(path, "rb") as file:
        return loads(file.read(), max_bytes=max_bytes)


def inspect(
    source: str | os.PathLike | bytes, *, max_bytes: int | None = DEFAULT_MAX_BYTES
) -> ArchiveInfo:
    """Per-tensor storage and byte accounting of an archive (a path or its bytes).

    The bytes of the tensors' sections plus ``header_bytes`` equal the file
    size; ``ArchiveInfo.table()`` prints them Deep-Compression style. Every
    check of :func:`load` runs, ``max_bytes`` included, but no dense tensor is
    built, so the memory used grows with the file's size, not with the
    tensors' shapes (pass ``max_bytes=None`` to account for an archive too
    large to load).

    Raises:
      ArchiveError: as :func:`load`.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)):
        with open(source, "rb") as file:
            source = file.read()
    return _parse(source, materialize=False, max_bytes=max_bytes)[2]
