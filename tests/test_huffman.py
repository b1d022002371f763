"""Tests for jaxopt_nn.huffman: optimal length-limited codes, canonical codes, round trips."""

import functools
import heapq
import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxopt_nn import huffman


def heapq_huffman_cost(counts):
    """Total bits of an unrestricted Huffman code (sum of merged weights)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def brute_force_cost(counts, max_length):
    """Smallest sum(count * length) over all prefix codes with lengths in [1, max_length]."""
    used = [c for c in counts if c > 0]
    if len(used) == 1:
        return used[0]
    best = None
    for lengths in itertools.product(range(1, max_length + 1), repeat=len(used)):
        if sum(2.0**-n for n in lengths) <= 1.0:
            cost = sum(c * n for c, n in zip(used, lengths, strict=True))
            best = cost if best is None else min(best, cost)
    return best


def bit_string(symbols, lengths):
    codes = huffman.canonical_codes(lengths)
    return "".join(format(int(codes[s]), f"0{int(lengths[s])}b") for s in symbols)


def make_symbols(seed, num_symbols, count, skew):
    """Uniform (skew=0) or geometric-like skewed symbols over [0, num_symbols)."""
    rng = np.random.default_rng(seed)
    if skew == 0:
        return rng.integers(0, num_symbols, count)
    probs = np.exp(-skew * np.arange(num_symbols))
    return rng.choice(num_symbols, size=count, p=probs / probs.sum())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=40))
def test_code_lengths_match_heapq_huffman_when_limit_does_not_bind(counts):
    counts = np.array(counts)
    lengths = huffman.code_lengths(counts, max_length=huffman.MAX_CODE_LENGTH)
    np.testing.assert_array_equal(lengths > 0, counts > 0)
    if counts.any():
        assert int(np.dot(counts, lengths)) == heapq_huffman_cost(counts)
        assert np.sum(2.0 ** -lengths[lengths > 0].astype(float)) <= 1.0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=2, max_size=6), st.integers(2, 4))
def test_code_lengths_are_optimal_under_the_limit(counts, max_length):
    counts = np.array(counts)
    if len(counts) > 2**max_length:
        return
    lengths = huffman.code_lengths(counts, max_length=max_length)
    assert lengths.max() <= max_length
    assert np.sum(2.0 ** -lengths.astype(float)) <= 1.0
    assert int(np.dot(counts, lengths)) == brute_force_cost(counts, max_length)


def test_code_lengths_binding_limit_on_fibonacci_counts():
    counts = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55])
    assert huffman.code_lengths(counts, max_length=24).max() == 9
    limited = huffman.code_lengths(counts, max_length=5)
    assert limited.max() == 5
    assert np.sum(2.0 ** -limited.astype(float)) <= 1.0
    assert np.dot(counts, limited) >= heapq_huffman_cost(counts)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=30))
def test_canonical_codes_are_prefix_free_and_canonical(raw_lengths):
    lengths = np.array(raw_lengths)
    if np.sum(2.0 ** -lengths.astype(float)) > 1.0:
        with pytest.raises(ValueError, match="Kraft"):
            huffman.canonical_codes(lengths)
        return
    codes = huffman.canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True)]
    for a, b in itertools.permutations(range(len(words)), 2):
        assert not words[b].startswith(words[a])
    order = sorted(range(len(words)), key=lambda s: (lengths[s], s))
    assert codes[order[0]] == 0
    for prev, cur in itertools.pairwise(order):
        expected = (int(codes[prev]) + 1) << int(lengths[cur] - lengths[prev])
        assert int(codes[cur]) == expected


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_symbols=st.integers(1, 300),
    count=st.integers(0, 3000),
    skew=st.sampled_from([0.0, 0.3, 2.0]),
    max_length=st.integers(9, 24),
    chunk_size=st.integers(1, 700),
)
def test_round_trip_matches_reference_bit_string(
    seed, num_symbols, count, skew, max_length, chunk_size
):
    symbols = make_symbols(seed, num_symbols, count, skew)
    lengths = huffman.code_lengths(
        np.bincount(symbols, minlength=num_symbols), max_length=max_length
    )
    stream = huffman.encode(symbols, lengths, chunk_size=chunk_size)
    reference = bit_string(symbols, lengths)
    assert stream.num_bits == len(reference) == int(lengths[symbols].sum())
    padded = reference + "0" * (-len(reference) % 8)
    expected = bytes(int(padded[i : i + 8], 2) for i in range(0, len(padded), 8))
    assert stream.data == expected
    np.testing.assert_array_equal(
        stream.chunk_offsets,
        np.cumsum(lengths[symbols])[::chunk_size] - lengths[symbols][::chunk_size],
    )
    np.testing.assert_array_equal(huffman.decode(stream, lengths, count), symbols)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    num_symbols=st.integers(1, 300),
    count=st.integers(1, 3000),
    skew=st.sampled_from([0.0, 2.0]),
    chunk_size=st.sampled_from([1, 33, 512]),
)
def test_jax_backend_decodes_like_numpy_under_jit(seed, num_symbols, count, skew, chunk_size):
    symbols = make_symbols(seed, num_symbols, count, skew)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=num_symbols))
    stream = huffman.encode(symbols, lengths, chunk_size=chunk_size)
    decoded = huffman.decode(stream, lengths, count, backend="jax")
    assert isinstance(decoded, jax.Array)
    expected = huffman.decode(stream, lengths, count)
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(np.asarray(decoded), symbols)


def test_decode_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'numpy' or 'jax'; got backend='torch'"):
        huffman.decode(
            huffman.encode(np.array([0, 1]), np.array([1, 1])), [1, 1], 2, backend="torch"
        )


def test_empty_input():
    lengths = huffman.code_lengths(np.zeros(4, np.int64))
    np.testing.assert_array_equal(lengths, 0)
    stream = huffman.encode(np.zeros(0, np.int64), lengths)
    assert stream.data == b"" and stream.num_bits == 0 and stream.chunk_offsets.size == 0
    assert huffman.decode(stream, lengths, 0).size == 0


def test_single_symbol_alphabet_uses_one_bit_per_symbol():
    symbols = np.full(1000, 3)
    lengths = huffman.code_lengths(np.bincount(symbols))
    np.testing.assert_array_equal(lengths, [0, 0, 0, 1])
    stream = huffman.encode(symbols, lengths, chunk_size=64)
    assert stream.num_bits == 1000
    np.testing.assert_array_equal(huffman.decode(stream, lengths, 1000), symbols)


def test_65536_symbol_alphabet():
    rng = np.random.default_rng(0)
    symbols = np.concatenate([np.arange(2**16), rng.integers(0, 2**16, 30_000)])
    counts = np.bincount(symbols, minlength=2**16)
    with pytest.raises(ValueError, match="need max_length >= 16"):
        huffman.code_lengths(counts, max_length=15)
    lengths = huffman.code_lengths(counts, max_length=16)
    np.testing.assert_array_equal(lengths, 16)
    stream = huffman.encode(symbols, lengths)
    decoded = huffman.decode(stream, lengths, symbols.size)
    assert decoded.dtype == np.int32
    np.testing.assert_array_equal(decoded, symbols)


@pytest.mark.parametrize(
    ("num_symbols", "dtype"), [(255, np.uint8), (256, np.uint16), (65535, np.uint16)]
)
def test_decoded_dtype_fits_alphabet(num_symbols, dtype):
    lengths = np.zeros(num_symbols, np.int64)
    lengths[[0, num_symbols - 1]] = 1
    stream = huffman.encode(np.array([0, num_symbols - 1]), lengths)
    decoded = huffman.decode(stream, lengths, 2)
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, [0, num_symbols - 1])


@pytest.mark.parametrize(
    ("counts", "kwargs", "match"),
    [
        ([1, 2], {"max_length": 0}, "max_length must be an integer in"),
        ([1, 2], {"max_length": 25}, "max_length must be an integer in"),
        ([1, -2], {}, "non-negative"),
        ([[1, 2]], {}, "1-D integer"),
        ([1.0, 2.0], {}, "1-D integer"),
        ([1, 1, 1, 1, 1], {"max_length": 2}, "5 used symbols"),
        ([2**60, 1, 1], {}, "counts must be below"),
    ],
)
def test_code_lengths_rejects_bad_arguments(counts, kwargs, match):
    with pytest.raises(ValueError, match=match):
        huffman.code_lengths(np.array(counts), **kwargs)


def test_encode_rejects_bad_arguments():
    lengths = np.array([1, 1, 0])
    with pytest.raises(ValueError, match="symbol 2 occurs"):
        huffman.encode(np.array([0, 2]), lengths)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        huffman.encode(np.array([0, 3]), lengths)
    with pytest.raises(ValueError, match="must be integers"):
        huffman.encode(np.array([0.0]), lengths)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        huffman.encode(np.array([0]), lengths, chunk_size=0)
    with pytest.raises(ValueError, match="Kraft"):
        huffman.encode(np.array([0]), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match=r"lie in \[0, 24\]"):
        huffman.encode(np.array([0]), np.array([25, 1]))


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_decode_detects_inconsistent_streams(backend):
    decode = functools.partial(huffman.decode, backend=backend)
    symbols = make_symbols(1, 20, 500, 0.3)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=20))
    stream = huffman.encode(symbols, lengths, chunk_size=100)
    with pytest.raises(ValueError, match="chunk offsets"):
        decode(stream, lengths, 401)
    with pytest.raises(ValueError, match="count must be a non-negative"):
        decode(stream, lengths, -1)
    shifted = stream._replace(chunk_offsets=stream.chunk_offsets + np.arange(5))
    with pytest.raises(ValueError, match="stored chunk offsets"):
        decode(shifted, lengths, 500)
    with pytest.raises(ValueError, match="must hold"):
        decode(stream._replace(data=stream.data + b"\0"), lengths, 500)
    with pytest.raises(ValueError, match="start at 0"):
        decode(stream._replace(chunk_offsets=stream.chunk_offsets[::-1]), lengths, 500)
    if stream.num_bits % 8:
        bad = stream.data[:-1] + bytes([stream.data[-1] | 1])
        with pytest.raises(ValueError, match="padding"):
            decode(stream._replace(data=bad), lengths, 500)
    with pytest.raises(ValueError, match="empty stream"):
        decode(stream._replace(chunk_offsets=np.zeros(0)), lengths, 0)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_decode_rejects_bit_patterns_outside_an_incomplete_code(backend):
    lengths = np.array([1, 2])  # codes 0 and 10; 11 is no codeword
    stream = huffman.EncodedStream(bytes([0b11000000]), 2, np.array([0]), 8)
    with pytest.raises(ValueError, match="no codeword|chunk offsets"):
        huffman.decode(stream, lengths, 1, backend=backend)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 300), st.integers(0, 2000), st.integers(0, 3), st.integers(1, 40)),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 2**16),
)
def test_decode_streams_equals_decoding_each_stream(specs, seed):
    streams, lengths, counts, expected = [], [], [], []
    for num_symbols, count, skew, chunk_size in specs:
        symbols = make_symbols(seed, num_symbols, count, skew)
        code = huffman.code_lengths(np.bincount(symbols, minlength=num_symbols))
        if not code.any():
            code[0] = 1
        streams.append(huffman.encode(symbols, code, chunk_size=chunk_size))
        lengths.append(code)
        counts.append(count)
        expected.append(huffman.decode(streams[-1], code, count))
    decoded = huffman.decode_streams(streams, lengths, counts)
    for got, want, count in zip(decoded, expected, counts, strict=True):
        assert got.dtype == want.dtype and got.shape == (count,)
        np.testing.assert_array_equal(got, want)


def test_decode_streams_groups_tables_within_the_budget(monkeypatch):
    rng = np.random.default_rng(3)
    symbols = [rng.integers(0, 40, 500) for _ in range(7)]
    lengths = [huffman.code_lengths(np.bincount(s, minlength=40)) for s in symbols]
    streams = [huffman.encode(s, n, chunk_size=64) for s, n in zip(symbols, lengths, strict=True)]
    groups = []
    lockstep = huffman._lockstep_numpy

    def spy(group, names):
        groups.append(sum(1 << s.longest for s in group))
        return lockstep(group, names)

    budget = 2 ** int(max(n.max() for n in lengths)) * 2
    monkeypatch.setattr(huffman, "_lockstep_numpy", spy)
    monkeypatch.setattr(huffman, "TABLE_BUDGET", budget)
    decoded = huffman.decode_streams(streams, lengths, [500] * 7)
    assert len(groups) > 1 and max(groups) <= budget
    for got, want in zip(decoded, symbols, strict=True):
        np.testing.assert_array_equal(got, want)


def test_decode_streams_names_the_inconsistent_stream():
    code = np.array([1, 1])
    good = huffman.encode(np.array([0, 1, 1]), code)
    bad = good._replace(num_bits=good.num_bits + 8, data=good.data + b"\0")
    with pytest.raises(ValueError, match="^second: stream does not decode"):
        huffman.decode_streams([good, bad], [code, code], [3, 3], names=["first", "second"])
    with pytest.raises(ValueError, match="^stream 1: stream of 3 bits must hold 1 bytes"):
        huffman.decode_streams([good, good._replace(data=b"")], [code, code], [3, 3])
    with pytest.raises(ValueError, match="same length; got 1, 2 and 2"):
        huffman.decode_streams([good], [code, code], [3, 3])
