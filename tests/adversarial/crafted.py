"""Builders of hostile files: archives, IDX and NPZ files an attacker could craft.

Every archive built here has valid CRC32s (an attacker recomputes them), so
the reader's other checks are what refuse it. Builders return bytes; the
tests write them to disk and read them in a bounded child process
(``worker.py``).
"""

import gzip
import io
import json
import struct
import zipfile
import zlib

import numpy as np

from jaxopt_nn import archive, huffman


def leb128(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def deflate_header(text: bytes) -> bytes:
    packer = zlib.compressobj(
        9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, archive.HEADER_DICTIONARY
    )
    return packer.compress(text) + packer.flush()


def forge(header, payloads=(), *, compressed: bytes | None = None, version: int = 1) -> bytes:
    """An archive with this header (JSON object or text) and section payloads, valid CRCs."""
    if compressed is None:
        text = header if isinstance(header, (str, bytes)) else json.dumps(header)
        compressed = deflate_header(text.encode() if isinstance(text, str) else text)
    body = b"JNZ" + bytes([version]) + leb128(len(compressed)) + compressed
    for payload in payloads:
        body += payload + zlib.crc32(payload).to_bytes(4, "little")
    return body + zlib.crc32(body).to_bytes(4, "little")


def _pack(bits: str) -> bytes:
    size = -(-len(bits) // 8)
    return int(bits.ljust(8 * size, "0") or "0", 2).to_bytes(size, "big")


def stream(symbols, lengths, *, width: int = 5, num_bits: int | None = None) -> bytes:
    """A Huffman stream (format spec) of few symbols in one chunk, codes from ``lengths``."""
    lengths = np.asarray(lengths)
    codes = huffman.canonical_codes(lengths)
    bits = "".join(format(int(codes[s]), f"0{lengths[s]}b") for s in symbols)
    table = "".join(format(int(n), f"0{width}b") for n in lengths)
    if not len(symbols):
        return leb128(0)
    return (
        leb128(len(symbols))
        + leb128(len(lengths))
        + bytes([width])
        + _pack(table)
        + leb128(len(bits) if num_bits is None else num_bits)
        + _pack(bits)
    )


def sparse(index_bits: int, positions_stream: bytes, values: bytes) -> bytes:
    return bytes([index_bits]) + positions_stream + values


# ----------------------------------------------------------------------------- header bombs


def repeated_deflate(head: bytes, unit: bytes, count: int, tail: bytes, zdict=None) -> bytes:
    """Raw deflate of ``head + unit * count + tail``, fast for a huge ``count``.

    Once the window holds only whole repeats of ``unit``, compressing the
    next chunk of repeats gives the same bytes every time: they are
    computed once and repeated.
    """
    per_chunk = max(1, (1 << 20) // len(unit))
    chunk = unit * per_chunk
    options = {} if zdict is None else {"zdict": zdict}
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, **options)
    chunks, rest = divmod(count, per_chunk)
    if not chunks:
        return packer.compress(head + unit * count + tail) + packer.flush()
    out = [packer.compress(head + chunk), packer.flush(zlib.Z_SYNC_FLUSH)]
    if chunks > 1:
        repeat = packer.compress(chunk) + packer.flush(zlib.Z_SYNC_FLUSH)
        again = packer.compress(chunk) + packer.flush(zlib.Z_SYNC_FLUSH)
        assert repeat == again  # the state no longer changes
        out.append(repeat * (chunks - 1))
    out.append(packer.compress(unit * rest + tail) + packer.flush())
    return b"".join(out)


def empty_dicts_header(count: int) -> bytes:
    """An archive whose header is ``[{},{},...]``: ``count`` empty dicts, no leaf."""
    compressed = repeated_deflate(b"[{}", b",{}", count - 1, b"]", archive.HEADER_DICTIONARY)
    return forge(None, compressed=compressed)


def colliding_int_keys(count: int) -> bytes:
    """``{"#": [[k * (2**61 - 1), null], ...]}``: integer keys that all hash to 0."""
    items = ",".join(f"[{k * (2**61 - 1)},null]" for k in range(count))
    return forge('{"#":[' + items + "]}")


def int_keys_sharing_low_bits(count: int) -> bytes:
    """In-range integer keys whose low 15 bits agree (the worst the reader allows)."""
    items = ",".join(f"[{(k << 15) - 2**31},null]" for k in range(count))
    return forge('{"#":[' + items + "]}")


def duplicate_last_key(count: int, *, mapping_form: bool) -> bytes:
    keys = [f"k{i}" for i in range(count)] + [f"k{count - 1}"]
    if mapping_form:
        return forge('{"#":[' + ",".join(f'["{k}",null]' for k in keys) + "]}")
    return forge("{" + ",".join(f'"{k}":null' for k in keys) + "}")


def widest_accepted_header(extra: int = 0) -> bytes:
    """``MAX_HEADER_NODES`` JSON values (``+ 2 * extra``), mostly empty dicts.

    Empty dicts are the costliest value per byte of JSON; incompressible
    metadata makes the compressed header long enough for the per-byte
    allowance to reach the absolute limit.
    """
    pad = [str(p) for p in np.random.default_rng(0).integers(0, 2**62, 1500)]
    prefix = '{"#m":{"pad":' + json.dumps(pad) + '},"#t":[{}'
    nodes = 1 + sum(prefix.count(c) for c in ",:[{")
    count = (archive.MAX_HEADER_NODES - nodes) // 2 + extra
    return forge(prefix + ",{}" * count + "]}")


def deep_nesting(depth: int) -> bytes:
    return forge("[" * depth + "]" * depth)


# ----------------------------------------------------------------------------- sections


def huge_sparse_tensors(count: int = 8, size: int = 2**31) -> bytes:
    """``count`` float64 tensors of ``size`` elements that keep nothing (117 bytes for 8)."""
    empty = bytes([1]) + leb128(0)
    header = {f"w{i}": ["s", [size], len(empty) + 4, "f8"] for i in range(count)}
    return forge(header, [empty] * count)


def one_bit_stream(symbols: int) -> bytes:
    """``symbols`` copies of symbol 0, coded with one bit each."""
    chunk = 4096 if symbols <= 2**16 else 1024  # the format's chunk size
    chunk_bits = np.full(-(-symbols // chunk) - 1, chunk, "<u2")  # every chunk but the last
    return (
        leb128(symbols)
        + leb128(1)  # a table of one symbol
        + bytes([1])  # one bit per code length
        + bytes([0x80])  # code length 1
        + chunk_bits.tobytes()
        + leb128(symbols)  # payload bits, all zero
        + bytes(-(-symbols // 8))
    )


def many_one_bit_streams(tensors: int = 100, symbols: int = 4096) -> bytes:
    """Codebook tensors keeping every position, all on one centroid: two 1-bit streams each."""
    one = one_bit_stream(symbols)
    payload = bytes([1]) + one + one + b"f" + np.float32(1.5).tobytes()
    header = {f"w{i}": ["q", [symbols], len(payload) + 4] for i in range(tensors)}
    return forge(header, [payload] * tensors)


def long_code_tables(tensors: int) -> bytes:
    """Tensors whose position code has 15-bit codewords: a 2**15-entry decode table each."""
    lengths = [*range(1, 16), 15]  # complete: 16 symbols, longest 15 bits
    payload = sparse(4, stream([0], lengths), np.float32(1.0).tobytes())
    header = {f"w{i}": ["s", [1], len(payload) + 4] for i in range(tensors)}
    return forge(header, [payload] * tensors)


def one_tensor(record, payload: bytes, name: str = "w", version: int = 1) -> bytes:
    """One tensor: ``record`` (method, shape, then any dtype fields) with its nbytes filled in."""
    method, shape, *codes = record
    return forge({name: [method, shape, len(payload) + 4, *codes]}, [payload], version=version)


def fixed(symbols, width: int, *, count: int | None = None) -> bytes:
    """A fixed-width stream (version 2): count, table size 0, the width, packed fields."""
    bits = "".join(format(int(v), f"0{width}b") for v in symbols)
    n = len(symbols) if count is None else count
    return leb128(n) + leb128(0) + bytes([width]) + _pack(bits)


def bitmap_codebook(bitmap: bytes, size: int, values: bytes, *, version: int = 2) -> bytes:
    """A codebook tensor of ``size`` weights whose positions are a bitmap, one centroid 1.5."""
    payload = bytes([0]) + bitmap + values + b"f" + np.float32(1.5).tobytes()
    return one_tensor(["q", [size]], payload, version=version)


def bitmap_padding() -> bytes:
    """Four weights, all kept, but a padding bit of the bitmap set."""
    return bitmap_codebook(bytes([0xF1]), 4, fixed([0] * 4, 1))


def bitmap_in_version_1() -> bytes:
    return bitmap_codebook(bytes([0xF0]), 4, fixed([0] * 4, 1), version=1)


def fixed_too_wide() -> bytes:
    """Ranks 0 and 1 packed at 3 bits: the writer packs at the width of the largest (1)."""
    return bitmap_codebook(bytes([0xC0]), 2, fixed([0, 1], 3))


def fixed_past_its_section() -> bytes:
    """A fixed-width stream declaring 2**62 16-bit symbols in a few bytes."""
    return bitmap_codebook(bytes([0xC0]), 2, fixed([0, 0], 16, count=2**62))


def bitmap_past_its_section() -> bytes:
    """A 2**30-element bool tensor whose bitmap would need 2**27 bytes; the file has one."""
    return one_tensor(["s", [2**30], "b1"], bytes([0, 0x80, 1]), version=2)


def long_bitmap(size: int) -> bytes:
    """A codebook tensor keeping all ``size`` weights: a bitmap of ones, 1-bit ranks."""
    ones = bytes([0xFF]) * (size // 8)
    return bitmap_codebook(ones, size, fixed(np.zeros(0), 1, count=size) + bytes(size // 8))


def raw_bool(byte: int) -> bytes:
    return one_tensor(["r", [3], "b1"], bytes([1, 0, byte]))


def sparse_bool(byte: int) -> bytes:
    # index width 2: symbol 1 is a gap of 1 (position 1); 3 would be the filler.
    return one_tensor(["s", [4], "b1"], sparse(2, stream([1], [1, 1]), bytes([byte])))


def int_leaf_stored_as_float(value: float) -> bytes:
    return one_tensor(["r", [2], "i1", "f8"], np.array([1.0, value], "<f8").tobytes())


def codebook(dtype_code: str | None, centroids: np.ndarray) -> bytes:
    """A codebook tensor of 4 weights, all kept, ranks 0..len(centroids)-1 cycled."""
    centroids = np.asarray(centroids)
    ranks = [i % centroids.size for i in range(4)]
    rank_lengths = [1] if centroids.size == 1 else [1] * 2 if centroids.size == 2 else None
    assert rank_lengths is not None
    tag = {2: b"e", 4: b"f", 8: b"d"}[centroids.dtype.itemsize]
    payload = (
        sparse(1, stream([0, 0, 0, 0], [1]), b"")
        + stream(ranks, rank_lengths)
        + tag
        + centroids.astype(centroids.dtype.newbyteorder("<")).tobytes()
    )
    record = ["q", [4]] + ([dtype_code] if dtype_code else [])
    return one_tensor(record, payload)


def position_out_of_range() -> bytes:
    # index width 4 (alphabet 16): symbol 9 = gap 9, kept position 9 in a tensor of 4.
    lengths = [0] * 9 + [1, 1]  # used symbols 9 and 10: complete code
    return one_tensor(["s", [4]], sparse(4, stream([9], lengths), np.float32(1).tobytes()))


def trailing_filler() -> bytes:
    # index width 1: symbol 1 is the filler; positions 0 then a filler at the end.
    return one_tensor(["s", [8]], sparse(1, stream([0, 1], [1, 1]), np.float32(1).tobytes()))


def incomplete_code() -> bytes:
    # lengths [1, 15]: valid prefix code, but no optimal code leaves half the space unused.
    return one_tensor(["s", [4]], sparse(4, stream([0], [1] + [0] * 14 + [15]), b"\0\0\x80?"))


def huge_varint() -> bytes:
    # a symbol count written in 10 bytes (2**63 and more).
    return one_tensor(["s", [4]], bytes([1]) + b"\xff" * 9 + b"\x01")


def overlong_varint() -> bytes:
    # the count 1 written as 0x81 0x00: not the shortest form.
    return one_tensor(["s", [4]], bytes([1]) + b"\x81\x00" + stream([0], [1])[1:])


def escape_names() -> bytes:
    params = {"\x1b[2J\x1b]0;pwned\x07": np.ones(2, np.float32), "ok\n| forged | row": np.ones(1)}
    return archive.dumps(params, metadata={"model\x1b[31m": "\x1b[5mblink"})


# ----------------------------------------------------------------------------- data files


def idx_header(type_code: int, shape) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def gzip_bomb(header: bytes, inflated: int, chunk: int = 1 << 24) -> bytes:
    """A gzip member: ``header`` then zeros up to ``inflated`` bytes, built in chunks.

    After the first chunk the deflate state is the same for every further
    chunk of zeros, so one chunk's output is repeated (valid gzip, CRC and
    size included) instead of compressing gigabytes.
    """
    zeros = bytes(chunk)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(header + zeros[len(header) :]) + packer.flush(zlib.Z_SYNC_FLUSH)
    repeat = packer.compress(zeros) + packer.flush(zlib.Z_SYNC_FLUSH)
    again = packer.compress(zeros) + packer.flush(zlib.Z_SYNC_FLUSH)
    assert repeat == again
    chunks = inflated // chunk
    crc = zlib.crc32(header + zeros[len(header) :])
    for _ in range(chunks - 1):
        crc = zlib.crc32(zeros, crc)
    body = first + repeat * (chunks - 1) + packer.flush()
    head = gzip.compress(b"")[:10]
    return head + body + struct.pack("<II", crc, (chunks * chunk) & 0xFFFFFFFF)


def npz(members: dict[str, bytes]) -> bytes:
    """An ``.npz`` (zip) of raw ``.npy`` members, deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape, dtype: str = "<f4") -> bytes:
    """A ``.npy`` header declaring ``shape`` (no data follows)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    )
    return buffer.getvalue()


def toy_npz(**override: bytes) -> bytes:
    rng = np.random.default_rng(0)
    members = {
        "x_train": npy(rng.integers(0, 255, (6, 4, 4), dtype=np.uint8)),
        "y_train": npy(np.arange(6) % 3),
        "x_test": npy(rng.integers(0, 255, (3, 4, 4), dtype=np.uint8)),
        "y_test": npy(np.arange(3) % 3),
    }
    return npz({**members, **override})
