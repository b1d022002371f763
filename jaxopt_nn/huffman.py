"""Canonical, length-limited Huffman codes with vectorised NumPy encode/decode.

Only the code lengths of a code are stored; the codewords follow from them
(canonical assignment, as in DEFLATE). Code lengths are optimal under a limit on
the longest codeword (package-merge). Encoding scatters all codewords at once
from their cumulative bit positions; decoding splits the stream into chunks of
``chunk_size`` symbols whose bit offsets are stored, and decodes all chunks in
lockstep with one table lookup per step, so the loop runs ``chunk_size`` times
whatever the stream length: in NumPy, or as a jitted ``lax.scan`` on JAX's
default device (``decode(..., backend='jax')``).

Example:
  >>> import numpy as np
  >>> symbols = np.array([0, 0, 0, 1, 2, 0, 1, 0])
  >>> lengths = code_lengths(np.bincount(symbols))
  >>> lengths.tolist(), canonical_codes(lengths).tolist()
  ([1, 2, 2], [0, 2, 3])
  >>> stream = encode(symbols, lengths)
  >>> stream.num_bits
  11
  >>> decode(stream, lengths, len(symbols)).tolist()
  [0, 0, 0, 1, 2, 0, 1, 0]

References:
  Huffman, "A Method for the Construction of Minimum-Redundancy Codes",
  Proc. IRE, https://doi.org/10.1109/JRPROC.1952.273898, 1952.
  Larmore and Hirschberg, "A Fast Algorithm for Optimal Length-Limited Huffman
  Codes", J. ACM, https://doi.org/10.1145/79147.79150, 1990 (package-merge).
  Deutsch, "DEFLATE Compressed Data Format Specification", RFC 1951, section
  3.2.2, https://www.rfc-editor.org/rfc/rfc1951, 1996 (canonical codes).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MAX_CODE_LENGTH = 24  # decode peeks max_length + 7 bits from a 32-bit window
DEFAULT_MAX_LENGTH = 15
DEFAULT_CHUNK_SIZE = 512


class EncodedStream(NamedTuple):
    """A Huffman-coded symbol stream.

    Codewords are packed most significant bit first; the last byte is padded
    with zero bits.
    """

    data: bytes  # ceil(num_bits / 8) bytes of packed codewords
    num_bits: int  # number of meaningful bits in ``data``
    chunk_offsets: np.ndarray  # int64, shape (ceil(count / chunk_size),): bit offset of each chunk
    chunk_size: int  # symbols per chunk (the last chunk may be shorter)


def _check_max_length(max_length: int) -> None:
    if not isinstance(max_length, (int, np.integer)) or not 1 <= max_length <= MAX_CODE_LENGTH:
        raise ValueError(
            f"max_length must be an integer in [1, {MAX_CODE_LENGTH}]; "
            f"got max_length={max_length!r}"
        )


def code_lengths(counts: np.ndarray, *, max_length: int = DEFAULT_MAX_LENGTH) -> np.ndarray:
    r"""Optimal prefix-code lengths for symbol counts, no code longer than ``max_length``.

    Minimises the total coded size under the length limit (package-merge),

    .. math::

       \min_{\ell} \sum_s c_s \ell_s
       \quad \text{s.t.} \quad \sum_{s: c_s > 0} 2^{-\ell_s} \le 1,
       \quad 1 \le \ell_s \le L,

    which is the Huffman optimum whenever the limit :math:`L` does not bind.

    Args:
      counts: non-negative integer counts, shape (num_symbols,).
      max_length: the longest allowed codeword, in [1, 24].

    Returns:
      uint8 lengths, shape (num_symbols,): 0 for symbols whose count is 0; a
      lone used symbol gets length 1.

    Raises:
      ValueError: if ``counts`` is not a 1-D array of non-negative integers, if
        more than ``2**max_length`` symbols are used, or if ``max_length`` is
        out of range.

    Example:
      >>> code_lengths(np.array([20, 8, 4, 2, 1, 1])).tolist()
      [1, 2, 3, 4, 5, 5]
      >>> code_lengths(np.array([20, 8, 4, 2, 1, 1]), max_length=3).tolist()
      [2, 2, 3, 3, 3, 3]
    """
    _check_max_length(max_length)
    counts = np.asarray(counts)
    if counts.ndim != 1 or not (
        np.issubdtype(counts.dtype, np.integer) or counts.dtype == np.bool_
    ):
        raise ValueError(
            f"counts must be a 1-D integer array; got shape {counts.shape}, dtype {counts.dtype}"
        )
    counts = counts.astype(np.int64)
    if counts.size and counts.min() < 0:
        raise ValueError(f"counts must be non-negative; got min(counts)={counts.min()}")
    lengths = np.zeros(counts.size, np.uint8)
    used = np.flatnonzero(counts)
    n = used.size
    if n <= 1:
        lengths[used] = 1
        return lengths
    if n > 2**max_length:
        raise ValueError(
            f"{n} used symbols do not fit codes of at most max_length={max_length} bits; "
            f"need max_length >= {int(np.ceil(np.log2(n)))}"
        )
    limit = min(int(max_length), n - 1)  # an unrestricted Huffman code is never longer
    if counts.max() >= 2 ** (62 - limit):
        raise ValueError(f"counts must be below 2**{62 - limit}; got max {counts.max()}")
    order = used[np.argsort(counts[used], kind="stable")]
    leaves = counts[order]
    # Package-merge: list j holds the leaves merged with pairs packed from list j - 1.
    # Sorting is stable with leaves first, so every selection below is a prefix.
    current = leaves
    leaf_flags = [np.ones(n, bool)]
    for _ in range(limit - 1):
        half = current.size // 2 * 2
        packages = current[0:half:2] + current[1:half:2]
        merged = np.concatenate([leaves, packages])
        perm = np.argsort(merged, kind="stable")
        current = merged[perm]
        leaf_flags.append(perm < n)
    # Select the 2n - 2 cheapest items of the last list; a selected package
    # selects its two children, i.e. a prefix twice as long one list down.
    take = 2 * n - 2
    depth = np.zeros(n, np.int64)
    for flags in reversed(leaf_flags):
        num_leaves = int(np.count_nonzero(flags[:take]))
        depth[:num_leaves] += 1
        take = 2 * (take - num_leaves)
    lengths[order] = depth
    return lengths


def _check_lengths(lengths: np.ndarray) -> np.ndarray:
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise ValueError(
            f"lengths must be a 1-D integer array; got shape {lengths.shape}, dtype {lengths.dtype}"
        )
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise ValueError(
            f"code lengths must lie in [0, {MAX_CODE_LENGTH}]; "
            f"got range [{lengths.min()}, {lengths.max()}]"
        )
    lengths = lengths.astype(np.int64)
    longest = int(lengths.max()) if lengths.size else 0
    kraft = int(np.sum(np.left_shift(1, longest - lengths[lengths > 0])))
    if kraft > 2**longest:
        raise ValueError(
            f"code lengths violate the Kraft inequality (sum 2**-length = {kraft / 2**longest}"
            " > 1): no prefix code has them"
        )
    return lengths


def _canonical(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Symbols in canonical order, their lengths, interval starts, longest length."""
    used = np.flatnonzero(lengths)
    order = used[np.argsort(lengths[used], kind="stable")]  # by length, then symbol
    ordered = lengths[order]
    longest = int(ordered[-1]) if ordered.size else 0
    widths = np.left_shift(1, longest - ordered)  # interval of each code in units of 2**-longest
    starts = np.cumsum(widths) - widths
    return order, ordered, starts, longest


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codewords for code lengths (shorter codes first, then by symbol).

    Args:
      lengths: integer code lengths, shape (num_symbols,); 0 means unused.

    Returns:
      uint32 codewords, shape (num_symbols,); codeword ``s`` is the low
      ``lengths[s]`` bits (0 where unused).

    Raises:
      ValueError: if the lengths are out of [0, 24] or violate the Kraft inequality.
    """
    lengths = _check_lengths(lengths)
    order, ordered, starts, longest = _canonical(lengths)
    codes = np.zeros(lengths.size, np.uint32)
    codes[order] = np.right_shift(starts, longest - ordered)
    return codes


def encode(
    symbols: np.ndarray, lengths: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> EncodedStream:
    """Huffman-code a symbol stream with the canonical code of ``lengths``.

    Args:
      symbols: integer symbols in ``[0, len(lengths))``, any shape (flattened in C order).
      lengths: code lengths, shape (num_symbols,), e.g. from :func:`code_lengths`.
      chunk_size: symbols per independently decodable chunk, >= 1.

    Returns:
      The :class:`EncodedStream`; its size is ``sum(lengths[symbols])`` bits.

    Raises:
      ValueError: if a symbol is out of range or has no code, or on bad lengths
        or ``chunk_size``.
    """
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got chunk_size={chunk_size!r}")
    lengths = _check_lengths(lengths)
    symbols = np.asarray(symbols).reshape(-1)
    if not np.issubdtype(symbols.dtype, np.integer):
        raise ValueError(f"symbols must be integers; got dtype {symbols.dtype}")
    if symbols.size == 0:
        return EncodedStream(b"", 0, np.zeros(0, np.int64), int(chunk_size))
    low, high = int(symbols.min()), int(symbols.max())
    if low < 0 or high >= lengths.size:
        raise ValueError(f"symbols must lie in [0, {lengths.size}); got range [{low}, {high}]")
    # Every codeword, left-aligned in 64 bits, is shifted to its offset in the
    # 32-bit word where it starts; it spills at most into the next word (<= 24
    # bits long), and every word holds the start of a codeword, so OR-reducing
    # per starting word and folding the low halves into the next word packs all.
    aligned = canonical_codes(lengths).astype(np.uint64) << (64 - lengths).astype(np.uint64)
    index = symbols.astype(np.intp, copy=False)
    symbol_lengths = lengths.astype(np.uint8).take(index)
    if not symbol_lengths.all():
        missing = int(symbols[np.argmin(symbol_lengths)])
        raise ValueError(f"symbol {missing} occurs in symbols but has code length 0")
    ends = np.cumsum(symbol_lengths, dtype=np.uint64)
    starts = ends - symbol_lengths
    num_bits = int(ends[-1])
    placed = aligned.take(index) >> (starts & np.uint64(31))
    words = starts >> np.uint64(5)
    firsts = np.flatnonzero(words[1:] != words[:-1])
    firsts += 1
    ored = np.bitwise_or.reduceat(placed, np.concatenate([[0], firsts]))
    packed = np.zeros(ored.size + 1, np.uint32)
    packed[:-1] = ored >> np.uint64(32)
    packed[1:] |= ored.astype(np.uint32)
    data = packed.astype(">u4").tobytes()[: (num_bits + 7) // 8]
    return EncodedStream(data, num_bits, starts[::chunk_size].astype(np.int64), int(chunk_size))


def _symbol_dtype(num_symbols: int) -> type:
    """Narrowest type for symbols below ``num_symbols``, keeping ``num_symbols`` (invalid) free."""
    return np.uint8 if num_symbols < 2**8 else np.uint16 if num_symbols < 2**16 else np.int32


def _decode_tables(streams: list[_Checked]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables of several streams, one after the other: (symbols, code lengths, starts).

    Stream ``i``'s table has ``2**longest_i`` entries indexed by its next
    ``longest_i`` bits: each codeword fills the entries it prefixes, in
    canonical order; entries past the last codeword (an incomplete code) hold
    the invalid symbol ``num_symbols_i`` and length 0. Built for all streams
    at once, with one ``repeat``.
    """
    sizes = np.array([1 << s.longest for s in streams], np.int64)
    dtype = np.result_type(*[_symbol_dtype(s.lengths.size) for s in streams])
    lengths = np.concatenate([s.lengths for s in streams])
    stream = np.repeat(np.arange(len(streams)), [s.lengths.size for s in streams])
    starts = np.cumsum([0] + [s.lengths.size for s in streams])[:-1]
    symbol = np.arange(lengths.size) - starts[stream]
    used = lengths > 0
    lengths, stream, symbol = lengths[used], stream[used], symbol[used]
    widths = np.left_shift(1, np.array([s.longest for s in streams])[stream] - lengths)
    # One more entry per stream covers what its codewords leave free (none if complete).
    free = sizes - np.bincount(stream, weights=widths, minlength=len(streams)).astype(np.int64)
    lengths = np.concatenate([lengths, np.zeros(len(streams), np.int64)])
    symbol = np.concatenate([symbol, [s.lengths.size for s in streams]])
    widths = np.concatenate([widths, free])
    last = np.concatenate([np.zeros(stream.size, bool), np.ones(len(streams), bool)])
    stream = np.concatenate([stream, np.arange(len(streams))])
    order = np.lexsort((symbol, lengths, last, stream))  # canonical within each stream
    widths = widths[order]
    return (
        np.repeat(symbol[order].astype(dtype), widths),
        np.repeat(lengths[order].astype(np.uint8), widths),
        np.cumsum(sizes) - sizes,
    )


def _windows(raw):
    """The 32-bit big-endian window starting at every byte (NumPy or JAX uint32 bytes)."""
    return raw[:-3] << 24 | raw[1:-2] << 16 | raw[2:-1] << 8 | raw[3:]


class _Checked(NamedTuple):
    """A stream whose sizes and offsets passed :func:`_check_stream`."""

    data: bytes
    num_bits: int
    offsets: np.ndarray  # int64 bit offset of each chunk
    chunk_size: int
    symbol_count: int
    lengths: np.ndarray  # int64 code lengths; len(lengths) flags invalid codewords
    longest: int
    complete: bool  # the codewords fill the code space (Kraft sum 1)


def _check_stream(stream: EncodedStream, lengths: np.ndarray, count: int) -> _Checked:
    """Check a stream's sizes against ``lengths`` and ``count``; build its decode tables."""
    lengths = _check_lengths(lengths)
    data, num_bits, offsets, chunk_size = stream
    offsets = np.asarray(offsets, np.int64).reshape(-1)
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer; got count={count!r}")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got chunk_size={chunk_size!r}")
    num_chunks = -(-count // chunk_size)
    if offsets.size != num_chunks:
        raise ValueError(
            f"stream has {offsets.size} chunk offsets; {count} symbols in chunks of "
            f"{chunk_size} need {num_chunks}"
        )
    if len(data) != (num_bits + 7) // 8:
        raise ValueError(
            f"stream of {num_bits} bits must hold {(num_bits + 7) // 8} bytes; got {len(data)}"
        )
    if num_bits % 8 and data[-1] & ((1 << (8 - num_bits % 8)) - 1):
        raise ValueError("stream padding bits must be zero")
    if count == 0:
        if num_bits:
            raise ValueError(f"an empty stream must hold 0 bits; got {num_bits}")
    elif not lengths.any():
        raise ValueError("lengths assign no codeword, but count > 0")
    elif offsets[0] != 0 or np.any(np.diff(offsets) < 1) or offsets[-1] >= num_bits:
        raise ValueError("chunk offsets must start at 0, increase, and lie inside the stream")
    longest = int(lengths.max(initial=0))
    kraft = int(np.sum(np.left_shift(1, longest - lengths[lengths > 0])))
    return _Checked(
        bytes(data),
        int(num_bits),
        offsets,
        int(chunk_size),
        int(count),
        lengths,
        longest,
        kraft == 1 << longest,
    )


def _lockstep_numpy(group: list[_Checked], names: list[str]) -> list[np.ndarray]:
    """Decode every chunk of every stream in ``group`` in lockstep.

    The lanes (one per chunk) are sorted by their symbol count, longest first,
    so step ``s`` runs on a prefix of them: the work is the total symbol
    count, and the Python loop runs once per step of the longest chunk,
    however many streams there are. Each lane reads its own stream's table
    (at an offset into one concatenated table) and its own stream's bytes
    (at an offset into one concatenated buffer).
    """
    symbol_table, length_table, table_base = _decode_tables(group)
    byte_base = np.cumsum([0] + [len(s.data) for s in group])[:-1]
    raw = np.frombuffer(b"".join(s.data for s in group) + bytes(4), np.uint8)
    window = _windows(raw.astype(np.uint32))
    # Per lane: stream, start bit, symbols, where its symbols go in the output.
    lane_stream = np.concatenate([np.full(s.offsets.size, i) for i, s in enumerate(group)])
    starts = np.concatenate([s.offsets + 8 * b for s, b in zip(group, byte_base, strict=True)])
    steps = np.concatenate(
        [
            np.minimum(s.chunk_size, s.symbol_count - s.chunk_size * np.arange(s.offsets.size))
            for s in group
        ]
    )
    out_base = np.cumsum(steps) - steps
    order = np.argsort(-steps, kind="stable")
    position_dtype = np.uint32 if 8 * raw.size < 2**32 else np.uint64
    length_table = length_table.astype(position_dtype)  # a same-type take is the fastest
    position = starts[order].astype(position_dtype)
    lane_drop = np.array([32 - s.longest for s in group], np.uint32)[lane_stream[order]]
    lane_table = table_base[lane_stream[order]].astype(np.uint32)
    # One shift for all lanes when their longest codes agree (always for one stream).
    drop = lane_drop[0] if lane_drop.min() == lane_drop.max() else None
    lane_out = out_base[order]
    sorted_steps = steps[order]
    # Lanes still running at step s: the first active[s] of them.
    active = np.searchsorted(-sorted_steps, -np.arange(int(sorted_steps[0])), side="left")
    # Lanes that run every step (full chunks) write rows of ``block``; the
    # shorter ones scatter straight into ``out``.
    steps_max, full = active.size, int(active[-1])
    block = np.empty((steps_max, full), symbol_table.dtype)
    out = np.empty(int(steps.sum()), symbol_table.dtype)
    ends = np.empty(position.size, np.int64)
    byte = np.empty(position.size, position_dtype)
    step_length = np.empty(position.size, position_dtype)
    shift, bits = np.empty(position.size, np.uint32), np.empty(position.size, np.uint32)
    target = np.empty(position.size, np.int64)
    # Steps with the same running lanes share their views; lanes that finish
    # at a segment's end record where they stopped.
    segments = [0, *(np.flatnonzero(np.diff(active)) + 1).tolist(), steps_max]
    for first, stop in zip(segments[:-1], segments[1:], strict=True):
        n = int(active[first])
        p, p_byte, p_shift, p_bits = position[:n], byte[:n], shift[:n], bits[:n]
        p_length, p_table = step_length[:n], lane_table[:n]
        p_drop = drop if drop is not None else lane_drop[:n]
        short_bits, short_out, short_target = bits[full:n], lane_out[full:n], target[full:n]
        for step in range(first, stop):
            np.right_shift(p, 3, out=p_byte)
            window.take(p_byte, out=p_bits, mode="clip")
            np.bitwise_and(p, 7, out=p_shift, casting="unsafe")
            np.left_shift(p_bits, p_shift, out=p_bits)
            np.right_shift(p_bits, p_drop, out=p_bits)
            if len(group) > 1:
                np.add(p_bits, p_table, out=p_bits)
            symbol_table.take(bits[:full], out=block[step], mode="clip")
            if n > full:
                np.add(short_out, step, out=short_target)
                out[short_target] = symbol_table.take(short_bits, mode="clip")
            length_table.take(p_bits, out=p_length, mode="clip")
            p += p_length
        remaining = int(active[stop]) if stop < steps_max else 0
        ends[remaining:n] = position[remaining:n]
    # Full lanes of one stream are consecutive chunks: copy each run of them at once.
    runs = np.flatnonzero(np.diff(lane_out[:full]) != steps_max) + 1
    for first, stop in zip(np.append(0, runs), np.append(runs, full), strict=True):
        start = int(lane_out[first])
        out[start : start + (stop - first) * steps_max] = block[:, first:stop].T.reshape(-1)
    lane_ends = np.empty_like(ends)
    lane_ends[order] = ends
    results, lane = [], 0
    for s, b, name in zip(group, byte_base, names, strict=True):
        got = lane_ends[lane : lane + s.offsets.size] - 8 * b
        lane += s.offsets.size
        if not np.array_equal(got, np.append(s.offsets[1:], s.num_bits)):
            raise ValueError(
                f"{name}: stream does not decode to the stored chunk offsets and bit count"
            )
    symbols = np.split(out, np.cumsum([s.symbol_count for s in group])[:-1])
    for s, decoded, name in zip(group, symbols, names, strict=True):
        if not s.complete and decoded.size and int(decoded.max()) >= s.lengths.size:
            raise ValueError(f"{name}: stream holds a bit pattern that is no codeword")
        results.append(decoded.astype(_symbol_dtype(s.lengths.size), copy=False))
    return results


TABLE_BUDGET = 1 << 22  # decode-table entries built at once by decode_streams


def decode_streams(
    streams: Sequence[EncodedStream],
    lengths: Sequence[np.ndarray],
    counts: Sequence[int],
    *,
    names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """Decode many streams at once: one lockstep pass over all their chunks (NumPy).

    Equivalent to ``[decode(s, l, c) for s, l, c in zip(streams, lengths, counts)]``,
    but the Python loop runs once per step of the longest chunk rather than
    once per step of every stream, so a thousand short streams cost about
    what one long one does. Decode tables are built for groups of streams of
    at most :data:`TABLE_BUDGET` entries together (a stream whose own table
    is larger forms a group alone), which bounds the memory whatever the code
    lengths.

    Args:
      streams: the encoded streams.
      lengths: the code lengths of each stream.
      counts: the number of symbols of each stream.
      names: one name per stream to start its error messages with; default
        ``'stream <i>'``.

    Returns:
      The symbols of each stream, as :func:`decode` returns them.

    Raises:
      ValueError: as :func:`decode`, for the first inconsistent stream; or if
        the three sequences differ in length.

    Example:
      >>> lengths = np.array([1, 1])
      >>> parts = [encode(np.array(s, int), lengths) for s in ([0, 1, 1], [1], [])]
      >>> [d.tolist() for d in decode_streams(parts, [lengths] * 3, [3, 1, 0])]
      [[0, 1, 1], [1], []]
    """
    if not len(streams) == len(lengths) == len(counts):
        raise ValueError(
            f"streams, lengths and counts must have the same length; got "
            f"{len(streams)}, {len(lengths)} and {len(counts)}"
        )
    names = [f"stream {i}" for i in range(len(streams))] if names is None else list(names)
    if len(names) != len(streams):
        raise ValueError(
            f"names must hold one name per stream; got {len(names)} for {len(streams)}"
        )
    checked = []
    for name, args in zip(names, zip(streams, lengths, counts, strict=True), strict=True):
        try:
            checked.append(_check_stream(*args))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    results = [np.zeros(0, _symbol_dtype(s.lengths.size)) for s in checked]
    group: list[int] = []
    entries = 0
    for i in [i for i, s in enumerate(checked) if s.symbol_count] + [-1]:
        size = 1 << checked[i].longest if i >= 0 else 0
        if group and (i < 0 or entries + size > TABLE_BUDGET):
            decoded_group = _lockstep_numpy([checked[j] for j in group], [names[j] for j in group])
            for j, decoded in zip(group, decoded_group, strict=True):
                results[j] = decoded
            group, entries = [], 0
        if i >= 0:
            group.append(i)
            entries += size
    return results


@functools.partial(jax.jit, static_argnames=("steps", "drop"))
def _lockstep_jax(
    raw: jax.Array,
    offsets: jax.Array,
    symbol_table: jax.Array,
    length_table: jax.Array,
    last_count: jax.Array,
    steps: int,
    drop: int,
) -> tuple[jax.Array, jax.Array]:
    """The same lockstep decode as one ``lax.scan`` (uint32 bit positions)."""
    window = _windows(raw.astype(jnp.uint32))

    def step(position, _):
        bits = window.at[position >> 3].get(mode="clip") << (position & 7) >> drop
        symbol = symbol_table.at[bits].get(mode="clip")
        return position + length_table.at[bits].get(mode="clip"), (symbol, position[-1])

    position, (out, last_positions) = jax.lax.scan(step, offsets, length=steps)
    last_end = jnp.append(last_positions, position[-1])[last_count]
    return out, jnp.append(position[:-1], last_end)


def decode(
    stream: EncodedStream, lengths: np.ndarray, count: int, *, backend: str = "numpy"
) -> np.ndarray | jax.Array:
    """Decode ``count`` symbols of a stream made by :func:`encode` with the same lengths.

    All chunks are decoded in lockstep, one table lookup per symbol: the lanes
    start at the stored chunk offsets, and after each chunk's symbols every
    lane must end exactly where the next chunk starts (the last one at
    ``num_bits``), which catches corrupt data and offsets.

    Args:
      stream: the encoded stream.
      lengths: the code lengths used to encode it, shape (num_symbols,).
      count: the number of symbols to decode.
      backend: ``'numpy'`` (a Python loop of ``chunk_size`` in-place NumPy
        steps) or ``'jax'`` (one jitted ``lax.scan`` on JAX's default device,
        e.g. to decode on an accelerator; streams below ``2**32`` bits; it
        compiles once per stream shape).

    Returns:
      The symbols, shape (count,): uint8 if ``num_symbols < 2**8``, uint16 if
      ``num_symbols < 2**16``, else int32 (one value is kept free to flag
      invalid codewords). A NumPy array, or a ``jax.Array`` for ``backend='jax'``.

    Raises:
      ValueError: if the stream is inconsistent with ``lengths`` and ``count``
        (invalid codeword, chunk offsets or bit count that do not match, wrong
        byte length or non-zero padding), or for an unknown ``backend``.
    """
    if backend not in ("numpy", "jax"):
        raise ValueError(f"backend must be 'numpy' or 'jax'; got backend={backend!r}")
    if backend == "numpy":
        try:
            return decode_streams([stream], [lengths], [count], names=[""])[0]
        except ValueError as err:
            raise ValueError(str(err).removeprefix(": ")) from None
    checked = _check_stream(stream, lengths, count)
    if count == 0:
        return jnp.zeros(0, _symbol_dtype(checked.lengths.size))
    offsets, chunk_size = checked.offsets, checked.chunk_size
    # Zero padding covers lanes that run past their chunk (the short last
    # chunk, or corrupt data) and the last 32-bit windows.
    raw = np.frombuffer(checked.data + bytes((chunk_size * checked.longest + 7) // 8 + 4), np.uint8)
    if 8 * raw.size >= 2**32:
        raise ValueError(
            f"backend='jax' decodes streams below 2**32 bits; got {checked.num_bits} bits "
            "(use backend='numpy')"
        )
    symbol_table, length_table, _ = _decode_tables([checked])
    out, ends = _lockstep_jax(
        jnp.asarray(raw),
        jnp.asarray(offsets, jnp.uint32),
        jnp.asarray(symbol_table),
        jnp.asarray(length_table, jnp.uint32),
        jnp.int32(count - (offsets.size - 1) * chunk_size),
        steps=min(chunk_size, count),
        drop=32 - checked.longest,
    )
    if not np.array_equal(np.asarray(ends, np.int64), np.append(offsets[1:], checked.num_bits)):
        raise ValueError("stream does not decode to the stored chunk offsets and bit count")
    symbols = out.T.reshape(-1)[:count]
    if not checked.complete and int(symbols.max()) >= checked.lengths.size:
        raise ValueError("stream holds a bit pattern that is no codeword")
    return symbols
