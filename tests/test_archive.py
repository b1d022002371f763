"""Tests for jaxopt_nn.archive: bit-exact round trips, byte accounting, corruption handling."""

import json
import os
import pathlib
import stat
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxopt_nn import archive, huffman
from jaxopt_nn.archive import ArchiveError
from jaxopt_nn.quantization import Codebook, codebook_weights


def bits_of(x):
    x = np.asarray(x)
    return x.view(f"u{x.dtype.itemsize}") if x.dtype != np.bool_ else x


def assert_bit_exact(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(bits_of(actual), bits_of(expected))


def assert_trees_bit_exact(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(assert_bit_exact, actual, expected)


def random_codebook(rng, shape, keep, bits):
    mask = rng.random(shape) < keep
    centroids = np.sort(rng.normal(size=2**bits)).astype(np.float32)
    indices = rng.integers(0, 2**bits, shape).astype(np.uint8 if bits <= 8 else np.uint16)
    return Codebook(
        jnp.asarray(centroids), jnp.asarray(np.where(mask, indices, 0)), jnp.asarray(mask)
    )


def pruned_quantized_tree(seed=0):
    rng = np.random.default_rng(seed)
    codebooks = {
        "fc1/kernel": random_codebook(rng, (64, 300), 0.08, 5),
        "fc2/kernel": random_codebook(rng, (300, 100), 0.1, 5),
        "conv/kernel": random_codebook(rng, (3, 3, 4, 8), 0.3, 8),
    }
    params = {
        "fc1": {"kernel": codebook_weights(codebooks["fc1/kernel"]), "bias": rng.normal(size=300)},
        "fc2": {"kernel": codebook_weights(codebooks["fc2/kernel"]), "bias": rng.normal(size=100)},
        "conv": {"kernel": codebook_weights(codebooks["conv/kernel"])},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return params, codebooks


# ----------------------------------------------------------------------------- round trips


def test_pruned_quantized_tree_round_trips_bit_exact(tmp_path):
    params, codebooks = pruned_quantized_tree()
    path = tmp_path / "model.jnz"
    written = archive.save(path, params, codebooks=codebooks)
    assert written == os.path.getsize(path)
    restored = archive.load(path)
    assert_trees_bit_exact(restored, jax.tree.map(np.asarray, params))
    for name, codebook in codebooks.items():
        layer, leaf = name.split("/")
        assert_bit_exact(restored[layer][leaf], np.asarray(codebook_weights(codebook)))
    methods = {t.name: t.method for t in archive.inspect(path).tensors}
    assert methods == {
        "conv/kernel": "codebook",
        "fc1/bias": "raw",
        "fc1/kernel": "codebook",
        "fc2/bias": "raw",
        "fc2/kernel": "codebook",
    }


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_codebook_leaf_returns_codebook_weights_in_leaf_dtype(dtype):
    rng = np.random.default_rng(1)
    codebook = random_codebook(rng, (40, 30), 0.2, 4)
    leaf = np.zeros((40, 30), dtype)  # the leaf's own values are not stored
    restored = archive.loads(archive.dumps({"w": leaf}, codebooks={"w": codebook}))
    if dtype == np.float64:  # no float64 in JAX without x64; the float32 values widen exactly
        expected = np.asarray(codebook_weights(codebook)).astype(np.float64)
    else:
        expected = np.asarray(codebook_weights(codebook, dtype))
    assert_bit_exact(restored["w"], expected)


def test_linen_dict_with_mixed_leaves_round_trips_bit_exact():
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(20, 10)).astype(np.float32)
    kernel[rng.random(kernel.shape) < 0.9] = 0.0
    kernel[0, :3] = [-0.0, np.nan, np.inf]
    params = {
        "params": {
            "Dense_0": {"kernel": kernel, "bias": rng.normal(size=10).astype(np.float32)},
            "Embed_0": {"embedding": rng.normal(size=(7, 3)).astype(ml_dtypes.bfloat16)},
            "scale": np.float32(1.5),
        },
        "batch_stats": {"mean": rng.normal(size=4), "count": np.arange(4, dtype=np.int32)},
        "flags": np.array([True, False, True]),
        "steps": np.uint64(2**63 + 5),
        "empty": np.zeros((0, 3), np.float32),
    }
    restored = archive.loads(archive.dumps(params))
    assert_trees_bit_exact(restored, jax.tree.map(np.asarray, params))
    kinds = {t.name: t.method for t in archive.inspect(archive.dumps(params)).tensors}
    assert kinds["params/Dense_0/kernel"] == "sparse"  # 90% zeros: smaller than raw
    assert kinds["params/Embed_0/embedding"] == "raw"  # dense: raw is smaller


def test_structure_with_lists_tuples_int_keys_and_hash_key():
    leaf = np.arange(3, dtype=np.float32)
    params = {
        "layers": [{"w": leaf}, None, {"w": leaf + 1}],
        "pair": (leaf, leaf * 2),
        "by_index": {0: {"w": leaf}, 1: {"w": leaf}},
        "odd": {"#": leaf, "x": leaf},
    }
    restored = archive.loads(archive.dumps(params))
    expected = {
        "layers": [{"w": leaf}, None, {"w": leaf + 1}],
        "pair": [leaf, leaf * 2],
        "by_index": {0: {"w": leaf}, 1: {"w": leaf}},
        "odd": {"#": leaf, "x": leaf},
    }
    assert_trees_bit_exact(restored, expected)
    assert list(restored["by_index"]) == [0, 1]
    assert_bit_exact(archive.loads(archive.dumps(leaf)), leaf)
    assert archive.loads(archive.dumps({})) == {}


class _Net(nnx.Module):
    def __init__(self, *, rngs):
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)])
        self.norm = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.norm(x)


def test_nnx_state_round_trips_through_pure_dict(tmp_path):
    model = _Net(rngs=nnx.Rngs(0))
    state = nnx.state(model)
    kernel = model.layers[0].kernel[...]
    codebook = Codebook(
        jnp.array([-0.25, 0.5], jnp.float32), (kernel > 0).astype(jnp.uint8), jnp.abs(kernel) > 0.2
    )
    path = tmp_path / "nnx.jnz"
    archive.save(path, state, codebooks={"layers/0/kernel": codebook})
    restored = archive.load(path)
    fresh = _Net(rngs=nnx.Rngs(1))
    fresh_state = nnx.state(fresh)
    nnx.replace_by_pure_dict(fresh_state, jax.tree.map(jnp.asarray, restored))
    nnx.update(fresh, fresh_state)
    expected = nnx.to_pure_dict(state)
    expected["layers"][0]["kernel"] = codebook_weights(codebook)
    assert_trees_bit_exact(
        jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(fresh))),
        jax.tree.map(np.asarray, expected),
    )
    x = jnp.ones((2, 8))
    nnx.update(model, nnx.state(fresh))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.lists(st.integers(0, 30), min_size=0, max_size=3),
    keep=st.floats(0.0, 1.0),
    dtype=st.sampled_from([np.float32, np.float16, np.int8, np.uint16, np.float64]),
    index_bits=st.one_of(st.none(), st.integers(1, 16)),
    bits=st.integers(1, 10),
)
def test_round_trip_property(seed, shape, keep, dtype, index_bits, bits):
    rng = np.random.default_rng(seed)
    dense = (rng.normal(size=shape) * 50).astype(dtype)
    dense = np.where(rng.random(shape) < keep, dense, np.zeros((), dtype))
    codebook = random_codebook(rng, tuple(shape), keep, bits)
    params = {"dense": dense, "quantized": np.zeros(shape, np.float32)}
    data = archive.dumps(
        params,
        codebooks={"quantized": codebook},
        where=lambda name, leaf: True,
        index_bits=index_bits,
    )
    restored = archive.loads(data)
    assert_bit_exact(restored["dense"], dense)
    assert_bit_exact(restored["quantized"], np.asarray(codebook_weights(codebook)))


# ----------------------------------------------------------------------------- options


def test_raw_dtype_casts_only_unselected_floating_leaves():
    params, codebooks = pruned_quantized_tree()
    params["fc1"]["step"] = np.int32(7)
    restored = archive.loads(archive.dumps(params, codebooks=codebooks, raw_dtype="float16"))
    bias = np.asarray(params["fc1"]["bias"])
    assert_bit_exact(restored["fc1"]["bias"], bias.astype(np.float16).astype(np.float32))
    assert_bit_exact(restored["fc1"]["step"], np.int32(7))
    assert_bit_exact(restored["fc1"]["kernel"], np.asarray(params["fc1"]["kernel"]))
    info = {t.name: t for t in archive.inspect(archive.dumps(params, raw_dtype="float16")).tensors}
    assert info["fc1/bias"].nbytes == 300 * 2 + 4
    assert info["fc1/bias"].weight_bits == 16.0


def test_centroids_are_stored_as_float16_only_when_exact():
    rng = np.random.default_rng(3)
    codebook = random_codebook(rng, (50, 50), 0.3, 5)
    exact = codebook._replace(centroids=codebook.centroids.astype(jnp.float16).astype(jnp.float32))
    leaf = {"w": np.zeros((50, 50), np.float32)}
    inexact_info = archive.inspect(archive.dumps(leaf, codebooks={"w": codebook})).tensors[0]
    exact_info = archive.inspect(archive.dumps(leaf, codebooks={"w": exact})).tensors[0]
    used = np.unique(np.asarray(codebook.indices)[np.asarray(codebook.mask)]).size
    assert inexact_info.codebook_bytes == 1 + 4 * used
    assert exact_info.codebook_bytes == 1 + 2 * used
    forced = archive.loads(archive.dumps(leaf, codebooks={"w": codebook}, centroid_dtype="float16"))
    half = codebook._replace(centroids=codebook.centroids.astype(jnp.float16).astype(jnp.float32))
    assert_bit_exact(forced["w"], np.asarray(codebook_weights(half)))


def test_automatic_index_bits_is_no_larger_than_any_fixed_width():
    rng = np.random.default_rng(4)
    codebook = random_codebook(rng, (200, 100), 0.05, 5)
    leaf = {"w": np.zeros((200, 100), np.float32)}

    def index_bytes(bits):
        data = archive.dumps(leaf, codebooks={"w": codebook}, index_bits=bits)
        return archive.inspect(data).tensors[0].index_bytes

    auto = index_bytes(None)
    assert all(auto <= index_bytes(bits) for bits in range(1, 11))


def with_version(data: bytes, version: int) -> bytes:
    """``data`` relabelled as another format version, file CRC32 recomputed."""
    body = data[:3] + bytes([version]) + data[4:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.floats(0.0, 1.0), size=st.integers(1, 300))
def test_each_stream_takes_its_smallest_coding(seed, keep, size):
    rng = np.random.default_rng(seed)
    mask = rng.random(size) < keep
    centroids = np.sort(rng.normal(size=4)).astype(np.float32)
    indices = np.where(mask, rng.integers(0, 4, size), 0).astype(np.uint8)
    codebook = Codebook(centroids, indices, mask)  # NumPy arrays: no compilation per size
    leaf = {"w": np.zeros(size, np.float32)}
    data = archive.dumps(leaf, codebooks={"w": codebook})
    assert_bit_exact(archive.loads(data)["w"], np.where(mask, centroids[indices], 0))
    info = archive.inspect(data).tensors[0]
    # No fixed index width gives a smaller position stream, nor does a bitmap.
    for bits in range(1, 17):
        forced = archive.inspect(archive.dumps(leaf, codebooks={"w": codebook}, index_bits=bits))
        assert info.index_bytes <= forced.tensors[0].index_bytes
    assert info.index_bytes <= 1 + -(-size // 8)
    kept = int(mask.sum())
    used = np.unique(indices[mask]).size
    if info.value_coding == "fixed":  # ranks packed at the width of the largest
        assert info.weight_bits == max(1, (used - 1).bit_length())
    assert info.value_bytes <= len(archive._varint_bytes(kept)) + 2 + -(-kept * 2 // 8)


@settings(max_examples=40, deadline=None)
@given(
    symbols=st.lists(st.integers(0, 40), min_size=0, max_size=300),
    skew=st.booleans(),
)
def test_stream_size_is_predicted_exactly_and_is_the_smaller_form(symbols, skew):
    symbols = np.asarray(symbols, np.int64)
    if skew:  # mostly one symbol: Huffman beats fixed width
        symbols = np.where(symbols % 5 == 0, symbols, 0)
    counts = np.bincount(symbols, minlength=41)
    out = bytearray()
    archive._write_stream(out, symbols, 41)
    assert len(out) == archive._stream_bytes(counts)
    if symbols.size:
        assert len(out) == min(archive._huffman_bytes(counts), archive._fixed_bytes(counts))


def test_bitmap_positions_and_fixed_width_values_round_trip():
    mask = np.ones(40, bool)
    mask[::3] = False  # two thirds kept: a bitmap beats relative indices
    codebook = Codebook(
        jnp.asarray([-1.0, 0.5, 2.0], jnp.float32),
        jnp.asarray(np.arange(40) % 3, jnp.uint8),
        jnp.asarray(mask),
    )
    data = archive.dumps({"w": np.zeros(40, np.float32)}, codebooks={"w": codebook})
    info = archive.inspect(data).tensors[0]
    assert (info.position_coding, info.index_bytes) == ("bitmap", 1 + 5)
    assert_bit_exact(archive.loads(data)["w"], np.asarray(codebook_weights(codebook)))
    few = codebook._replace(mask=jnp.asarray(np.arange(40) < 3))  # three weights
    data = archive.dumps({"w": np.zeros(40, np.float32)}, codebooks={"w": few})
    info = archive.inspect(data).tensors[0]
    assert info.value_coding == "fixed" and info.weight_bits == 2.0
    assert_bit_exact(archive.loads(data)["w"], np.asarray(codebook_weights(few)))


def test_version_1_archives_load_and_new_codings_need_version_2():
    rng = np.random.default_rng(0)
    skewed = rng.choice(8, size=(64, 300), p=0.5 ** np.arange(1, 9) / (1 - 0.5**8))
    mask = jnp.asarray(rng.random((64, 300)) < 0.05)
    codebook = Codebook(jnp.linspace(-1.0, 1.0, 8), jnp.asarray(skewed, jnp.uint8), mask)
    params = {"w": np.zeros((64, 300), np.float32), "b": np.ones(3, np.float32)}
    data = archive.dumps(params, codebooks={"w": codebook})  # only version-1 codings
    codings = [(t.position_coding, t.value_coding) for t in archive.inspect(data).tensors]
    assert codings == [("", "raw"), ("huffman", "huffman")]
    assert data[3] == archive.VERSION == 2
    assert_trees_bit_exact(archive.loads(with_version(data, 1)), archive.loads(data))
    few = codebook._replace(mask=jnp.asarray(np.arange(64 * 300).reshape(64, 300) < 3))
    data = archive.dumps({"w": params["w"]}, codebooks={"w": few})
    assert archive.inspect(data).tensors[0].value_coding == "fixed"
    with pytest.raises(ArchiveError, match="code table of 0 symbols"):
        archive.loads(with_version(data, 1))
    mask = np.arange(16) % 4 != 0
    bitmap = Codebook(jnp.ones(1), jnp.zeros(16, jnp.uint8), jnp.asarray(mask))
    data = archive.dumps({"w": np.zeros(16, np.float32)}, codebooks={"w": bitmap})
    assert archive.inspect(data).tensors[0].position_coding == "bitmap"
    with pytest.raises(ArchiveError, match=r"index width 0 not in \[1, 16\]"):
        archive.loads(with_version(data, 1))


def test_fillers_encode_gaps_longer_than_the_index_width():
    weight = np.zeros(1000, np.float32)
    weight[[0, 1, 300, 301, 999]] = [1.0, 2.0, 3.0, 4.0, 5.0]
    for bits in (1, 2, 3, 9, 10):
        restored = archive.loads(
            archive.dumps({"w": weight}, where=lambda n, x: True, index_bits=bits)
        )
        assert_bit_exact(restored["w"], weight)


# ----------------------------------------------------------------------------- accounting


def test_byte_accounting_sums_to_the_file_size(tmp_path):
    params, codebooks = pruned_quantized_tree()
    path = tmp_path / "m.jnz"
    archive.save(path, params, codebooks=codebooks, raw_dtype="float16")
    info = archive.inspect(path)
    assert info.header_bytes + sum(t.nbytes for t in info.tensors) == os.path.getsize(path)
    assert info.file_bytes == os.path.getsize(path)
    for t in info.tensors:
        assert t.index_bytes + t.value_bytes + t.codebook_bytes + 4 == t.nbytes
    fc1 = {t.name: t for t in info.tensors}["fc1/kernel"]
    mask = np.asarray(codebooks["fc1/kernel"].mask)
    assert fc1.kept == int(mask.sum()) and fc1.size == mask.size
    assert fc1.value_bytes >= fc1.weight_bits * fc1.kept / 8
    assert fc1.index_bytes >= fc1.index_bits * fc1.kept / 8
    assert 0 < fc1.weight_bits <= 8  # 5-bit indices, Huffman-coded
    original = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    assert info.original_bytes == original
    np.testing.assert_allclose(info.compression, original / os.path.getsize(path), rtol=1e-12)
    table = info.table()
    assert "fc1/kernel" in table and "(header)" in table
    assert f"{os.path.getsize(path):,}" in table.splitlines()[-1]


def test_header_is_compact_for_a_small_mlp():
    params, codebooks = pruned_quantized_tree()
    info = archive.inspect(archive.dumps(params, codebooks=codebooks, raw_dtype="float16"))
    assert info.header_bytes < 100


# ----------------------------------------------------------------------------- files


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "m.jnz"
    archive.save(path, {"w": np.ones(3, np.float32)})
    before = path.read_bytes()
    with pytest.raises(TypeError, match="cannot store"):
        archive.save(path, {"w": "text"})
    assert path.read_bytes() == before
    archive.save(str(path), {"w": np.zeros(3, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["m.jnz"]
    assert_bit_exact(archive.load(path)["w"], np.zeros(3, np.float32))


# ----------------------------------------------------------------------------- errors


def small_archive():
    params, codebooks = pruned_quantized_tree()
    params = {"fc2": params["fc2"]}
    return archive.dumps(params, codebooks={"fc2/kernel": codebooks["fc2/kernel"]})


def test_archive_error_is_a_value_error():
    assert issubclass(ArchiveError, ValueError)


def test_wrong_magic_and_unknown_version():
    data = small_archive()
    with pytest.raises(ArchiveError, match="not a jaxopt_nn archive"):
        archive.loads(b"PK\x03\x04" + data[4:])
    with pytest.raises(ArchiveError, match="unsupported archive format version 3"):
        archive.loads(data[:3] + b"\x03" + data[4:])
    with pytest.raises(ArchiveError, match="truncated archive"):
        archive.loads(data[:2])


def test_every_truncation_raises():
    data = small_archive()
    for end in range(len(data)):
        with pytest.raises(ArchiveError):
            archive.loads(data[:end])
    with pytest.raises(ArchiveError, match="truncated or has extra bytes"):
        archive.loads(data + b"\0")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_flipped_or_truncated_bytes_always_raise(data):
    blob = bytearray(small_archive())
    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(blob) - 1), st.integers(1, 255)), min_size=1, max_size=4
        )
    )
    for position, xor in flips:
        blob[position] ^= xor
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    if bytes(blob) == small_archive():
        return
    with pytest.raises(ArchiveError):
        archive.loads(bytes(blob))


def rebuild(data, edit_header):
    """An archive with an edited header and valid checksums (consistency checks only)."""
    size = data[4]
    unpacker = zlib.decompressobj(-15, zdict=archive.HEADER_DICTIONARY)
    header = json.loads(unpacker.decompress(data[5 : 5 + size]))
    header = edit_header(header)
    packer = zlib.compressobj(
        9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, archive.HEADER_DICTIONARY
    )
    text = packer.compress(json.dumps(header).encode()) + packer.flush()
    assert len(text) < 128
    body = data[:4] + bytes([len(text)]) + text + data[5 + size : -4]
    return body + zlib.crc32(body).to_bytes(4, "little")


def test_inconsistent_lengths_with_valid_checksums_raise():
    data = small_archive()

    def shrink_kernel(header):
        header["fc2"]["kernel"][1] = [10, 10]
        return header

    with pytest.raises(ArchiveError, match="outside a tensor"):
        archive.loads(rebuild(data, shrink_kernel))

    def grow_bias(header):
        header["fc2"]["bias"][1] = [101]
        return header

    with pytest.raises(ArchiveError, match=r"fc2/bias.: needs 404 more bytes"):
        archive.loads(rebuild(data, grow_bias))

    def bad_method(header):
        header["fc2"]["bias"][0] = "z"
        return header

    with pytest.raises(ArchiveError, match="malformed record"):
        archive.loads(rebuild(data, bad_method))

    def as_sparse(header):
        header["fc2"]["kernel"][0] = "s"
        return header

    with pytest.raises(ArchiveError, match="fc2/kernel"):
        archive.loads(rebuild(data, as_sparse))


def test_flipped_byte_in_a_section_is_reported_even_with_a_valid_file_crc():
    data = bytearray(small_archive())
    data[-10] ^= 1
    body = bytes(data[:-4])
    with pytest.raises(ArchiveError, match="section CRC32 does not match"):
        archive.loads(body + zlib.crc32(body).to_bytes(4, "little"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"index_bits": 0}, ValueError, "index_bits must be None"),
        ({"index_bits": 17}, ValueError, "index_bits must be None"),
        ({"raw_dtype": "int8"}, ValueError, "raw_dtype must be"),
        ({"centroid_dtype": "bfloat16"}, ValueError, "centroid_dtype must be"),
        ({"codebooks": {"nope": None}}, ValueError, r"codebooks names \['nope'\]"),
    ],
)
def test_dumps_rejects_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        archive.dumps({"w": np.ones((2, 2), np.float32)}, **kwargs)


def test_dumps_rejects_bad_codebooks_and_leaves():
    rng = np.random.default_rng(5)
    codebook = random_codebook(rng, (4, 4), 0.5, 2)
    with pytest.raises(ValueError, match="mask shape"):
        archive.dumps({"w": np.ones((4, 5), np.float32)}, codebooks={"w": codebook})
    too_few = codebook._replace(
        centroids=codebook.centroids[:1],
        indices=jnp.ones((4, 4), jnp.uint8),
        mask=jnp.ones((4, 4), bool),
    )
    with pytest.raises(ValueError, match="but 1 centroids"):
        archive.dumps({"w": np.ones((4, 4), np.float32)}, codebooks={"w": too_few})
    with pytest.raises(TypeError, match="must be floating"):
        archive.dumps({"w": np.ones((4, 4), np.int32)}, codebooks={"w": codebook})
    with pytest.raises(TypeError, match="cannot store"):
        archive.dumps({"w": np.ones(2, np.complex64)})
    with pytest.raises(TypeError, match="not an array"):
        archive.dumps({"w": object()})
    with pytest.raises(TypeError, match="keys must be str or int"):
        archive.dumps({(1, 2): np.ones(2, np.float32)})


def test_metadata_round_trips_and_reserved_keys_stay_data():
    params = {"#m": np.ones(2, np.float32), "#t": np.zeros(3, np.float32)}
    data = archive.dumps(params, metadata={"model": "lenet300", "in_shape": [8, 8, 1]})
    assert archive.inspect(data).metadata == {"model": "lenet300", "in_shape": [8, 8, 1]}
    restored = archive.loads(data)
    np.testing.assert_array_equal(restored["#m"], params["#m"])
    np.testing.assert_array_equal(restored["#t"], params["#t"])
    assert archive.inspect(archive.dumps(params)).metadata is None


def test_metadata_must_be_json():
    with pytest.raises(TypeError, match="metadata"):
        archive.dumps({"w": np.ones(2, np.float32)}, metadata={"x": object()})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        archive.dumps({"w": np.ones(2, np.float32)}, metadata=[1])


def test_write_atomic_leaves_old_file_on_error(tmp_path):
    path = tmp_path / "model.jnz"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        archive.write_atomic(path, "not bytes")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.jnz"]


# ----------------------------------------------------------------------------- forged files


def leb128(value):
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def forge(header, payloads):
    """An archive with this header (JSON text or object) and section payloads, valid CRCs."""
    text = header if isinstance(header, str) else json.dumps(header)
    packer = zlib.compressobj(
        9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, archive.HEADER_DICTIONARY
    )
    compressed = packer.compress(text.encode()) + packer.flush()
    body = b"JNZ\x01" + leb128(len(compressed)) + compressed
    for payload in payloads:
        body += payload + zlib.crc32(payload).to_bytes(4, "little")
    return body + zlib.crc32(body).to_bytes(4, "little")


EMPTY_POSITIONS = bytes([1]) + leb128(0)  # index width 1, a stream of no symbols


def empty_sparse(shape, dtype="f8"):
    """A sparse tensor that keeps nothing: its section does not grow with its shape."""
    return forge({"w": ["s", shape, len(EMPTY_POSITIONS) + 4, dtype]}, [EMPTY_POSITIONS])


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([2**70], r"at most 2\*\*40 elements"),
        ([2**41], r"at most 2\*\*40 elements"),
        ([2**21, 2**21], r"at most 2\*\*40 elements"),
        ([0, 2**41], r"at most 2\*\*40 elements"),
        ([1] * 65, "65 dimensions"),
    ],
)
def test_forged_shapes_beyond_the_reader_limits_raise_archive_error(shape, match):
    data = empty_sparse(shape)
    with pytest.raises(ArchiveError, match=match):
        archive.inspect(data)
    with pytest.raises(ArchiveError, match=match):
        archive.loads(data)


def test_inspect_accounts_for_a_huge_sparse_tensor_without_building_it():
    shape = [2**20, 2**20]  # 8 TiB of float64 zeros, described by a 6-byte section
    info = archive.inspect(empty_sparse(shape), max_bytes=None).tensors[0]
    assert (info.shape, info.size, info.kept, info.method) == (tuple(shape), 2**40, 0, "sparse")
    assert info.index_bytes + info.value_bytes + info.codebook_bytes + 4 == info.nbytes
    assert archive.inspect(empty_sparse([0, 2**40])).tensors[0].size == 0
    with pytest.raises(ArchiveError, match=r"decodes to 8,796,093,022,208 bytes, more than"):
        archive.inspect(empty_sparse(shape))


def test_a_tensor_too_large_to_allocate_raises_archive_error_with_its_size(monkeypatch):
    zeros = np.zeros

    def no_large_zeros(shape, *args, **kwargs):  # a machine with little memory
        if np.prod(shape, dtype=np.float64) * 8 > 2**30:
            raise MemoryError("Unable to allocate")
        return zeros(shape, *args, **kwargs)

    monkeypatch.setattr(np, "zeros", no_large_zeros)
    with pytest.raises(ArchiveError, match=r"tensor 'w' of shape \(65536, 65536\) needs 34,359"):
        archive.loads(empty_sparse([2**16, 2**16]), max_bytes=None)


def stream(symbols, lengths, width=5):
    """A Huffman stream (format spec) for few symbols in one chunk; codes from ``lengths``."""
    codes = huffman.canonical_codes(np.asarray(lengths))
    bits = "".join(format(int(codes[s]), f"0{lengths[s]}b") for s in symbols)
    table = "".join(format(length, f"0{width}b") for length in lengths)

    def pack(text):
        return int(text.ljust(-(-len(text) // 8) * 8, "0") or "0", 2).to_bytes(
            -(-len(text) // 8), "big"
        )

    return (
        leb128(len(symbols))
        + leb128(len(lengths))
        + bytes([width])
        + pack(table)
        + leb128(len(bits))
        + pack(bits)
    )


@pytest.mark.parametrize(("longest", "accepted"), [(15, True), (16, False), (24, False)])
def test_code_lengths_beyond_the_writers_limit_raise_archive_error(longest, accepted):
    values = np.array([1.0, 2.0], "<f4")
    lengths = [
        *range(1, longest + 1),
        longest,
    ]  # a complete code: lengths 1..longest, longest twice
    payload = bytes([16]) + stream([0, 0], lengths) + values.tobytes()
    data = forge({"w": ["s", [4], len(payload) + 4]}, [payload])
    if accepted:
        assert_bit_exact(archive.loads(data)["w"], np.array([1.0, 2.0, 0.0, 0.0], np.float32))
    else:
        with pytest.raises(ArchiveError, match=f"code length {longest} exceeds 15 bits"):
            archive.loads(data)


def fibonacci(n):
    out = [1, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return np.array(out)


@pytest.mark.parametrize(
    "counts",
    [fibonacci(22), np.ones(40_000, np.int64)],
    ids=["skewed-needs-the-15-bit-limit", "40000-symbols-need-16-bits"],
)
def test_writer_streams_at_the_length_limit_load(counts):
    unlimited = huffman.code_lengths(counts, max_length=huffman.MAX_CODE_LENGTH)
    assert unlimited.max() > 15  # the writer's limit binds (or is raised to 16)
    indices = np.repeat(np.arange(counts.size), counts)
    np.random.default_rng(6).shuffle(indices)
    centroids = np.arange(counts.size, dtype=np.float32) + 1
    codebook = Codebook(centroids, indices.astype(np.uint16), np.ones(indices.size, bool))
    restored = archive.loads(
        archive.dumps({"w": np.zeros(indices.size, np.float32)}, codebooks={"w": codebook})
    )
    assert_bit_exact(restored["w"], centroids[indices])


@pytest.mark.parametrize("dtype", [np.float64, ml_dtypes.bfloat16, np.float16])
def test_codebook_centroids_round_trip_bit_exact_in_the_leaf_dtype(dtype):
    rng = np.random.default_rng(7)
    centroids = np.concatenate([[0.1, -1 / 3], rng.normal(size=14)])  # float64
    indices = rng.integers(0, centroids.size, (30, 20)).astype(np.uint8)
    mask = rng.random((30, 20)) < 0.5
    codebook = Codebook(centroids, indices, mask)
    data = archive.dumps({"w": np.zeros((30, 20), dtype)}, codebooks={"w": codebook})
    expected = np.where(mask, centroids.astype(dtype)[indices], np.zeros((), dtype))
    assert_bit_exact(archive.loads(data)["w"], expected)
    if dtype == np.float64:  # 0.1 needs float64 centroids
        used = np.unique(indices[mask]).size
        assert archive.inspect(data).tensors[0].codebook_bytes == 1 + 8 * used


def test_centroid_dtype_float64_forces_eight_byte_centroids():
    codebook = Codebook(
        np.array([0.5, 1.5], np.float32), np.array([0, 1, 1], np.uint8), np.ones(3, bool)
    )
    leaf = {"w": np.zeros(3, np.float32)}
    forced = archive.dumps(leaf, codebooks={"w": codebook}, centroid_dtype="float64")
    automatic = archive.dumps(leaf, codebooks={"w": codebook})
    assert archive.inspect(forced).tensors[0].codebook_bytes == 1 + 8 * 2
    assert archive.inspect(automatic).tensors[0].codebook_bytes == 1 + 2 * 2  # float16 is exact
    assert_bit_exact(archive.loads(forced)["w"], np.array([0.5, 1.5, 1.5], np.float32))


def test_duplicate_keys_in_the_header_raise_archive_error():
    payload = np.ones(2, "<f4").tobytes()
    record = ["r", [2], len(payload) + 4]
    with pytest.raises(ArchiveError, match="key 0 appears twice"):
        archive.loads(forge({"#": [[0, record], [0, record]]}, [payload, payload]))
    text = json.dumps(record)
    with pytest.raises(ArchiveError, match="key 'a' appears twice"):
        archive.loads(forge(f'{{"a":{text},"a":{text}}}', [payload, payload]))
    assert archive.loads(forge({"#": [[0, record], ["0", record]]}, [payload, payload])).keys() == {
        0,
        "0",
    }


def test_records_hold_dtype_fields_as_the_format_spec_says():
    def records(params, **kwargs):
        data = archive.dumps(params, **kwargs)
        size = data[4]
        unpacker = zlib.decompressobj(-15, zdict=archive.HEADER_DICTIONARY)
        return json.loads(unpacker.decompress(data[5 : 5 + size]))

    leaves = {"a": np.ones(3, np.float32), "b": np.ones(3, np.float64), "c": np.ones(3, np.int8)}
    assert records(leaves, where=lambda n, x: False) == {
        "a": ["r", [3], 16],
        "b": ["r", [3], 28, "f8"],
        "c": ["r", [3], 7, "i1"],
    }
    assert records(leaves, where=lambda n, x: False, raw_dtype="float16") == {
        "a": ["r", [3], 10, "f4", "f2"],
        "b": ["r", [3], 10, "f8", "f2"],
        "c": ["r", [3], 7, "i1"],
    }


def test_format_spec_gives_the_header_dictionary_and_the_reader_limits():
    spec = (pathlib.Path(__file__).parents[1] / "docs" / "archive-format.md").read_text()
    block = spec.split("```text\n", 1)[1].split("\n```", 1)[0]
    assert block.encode() == archive.HEADER_DICTIONARY
    assert f"{len(archive.HEADER_DICTIONARY)} bytes" in spec
    assert f"{zlib.crc32(archive.HEADER_DICTIONARY):08x}" in spec
    assert f"2**{archive.MAX_ELEMENTS.bit_length() - 1}" in spec
    assert f"more than {archive.MAX_NDIM} dimensions" in spec


# ----------------------------------------------------------------------------- write_atomic


def test_write_atomic_errors_name_the_destination(tmp_path):
    missing = tmp_path / "nodir" / "model.jnz"
    with pytest.raises(FileNotFoundError) as error:
        archive.write_atomic(missing, b"data")
    assert error.value.filename == str(missing)
    assert ".tmp" not in str(error.value)
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError) as error:
        archive.write_atomic(tmp_path / "dir", b"data")
    assert error.value.filename == str(tmp_path / "dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_write_atomic_keeps_the_mode_of_a_replaced_file_and_applies_the_umask(tmp_path):
    private = tmp_path / "private.jnz"
    private.write_bytes(b"old")
    private.chmod(0o600)
    archive.write_atomic(private, b"new")
    assert (private.read_bytes(), stat.S_IMODE(private.stat().st_mode)) == (b"new", 0o600)
    old_umask = os.umask(0o027)
    try:
        archive.write_atomic(tmp_path / "new.jnz", b"new")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "new.jnz").stat().st_mode) == 0o640


def test_write_atomic_replaces_the_target_of_a_symlink(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "model.jnz"
    target.write_bytes(b"old")
    link = tmp_path / "model.jnz"
    link.symlink_to(os.path.join("store", "model.jnz"))
    assert archive.write_atomic(link, memoryview(b"new")) == 3
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["model.jnz"]


def test_write_atomic_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    archive.write_atomic(tmp_path / "m.jnz", b"data")
    assert synced == [False, True]
    open_ = os.open

    def no_directories(path, flags, *args):  # e.g. Windows, where directories cannot be opened
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", path)
        return open_(path, flags, *args)

    monkeypatch.setattr(os, "open", no_directories)
    synced.clear()
    archive.write_atomic(tmp_path / "m.jnz", b"more")
    assert synced == [False] and (tmp_path / "m.jnz").read_bytes() == b"more"


# ----------------------------------------------------------------------------- structure


def normalized(tree):
    """``tree`` as ``load`` returns it: tuples become lists, arrays NumPy."""
    if isinstance(tree, dict):
        return {k: normalized(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [normalized(v) for v in tree]
    return tree if tree is None else np.asarray(tree)


def assert_same_tree(actual, expected):
    """Same containers, keys (and their order), ``None`` and bit-exact arrays."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), (actual, expected)
        for key in expected:
            assert_same_tree(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (actual, expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same_tree(a, e)
    elif expected is None:
        assert actual is None
    else:
        assert_bit_exact(actual, expected)


LEAF_DTYPES = ["float32", "float16", "float64", "int8", "int32", "uint16", "bool"]


@st.composite
def leaves(draw):
    dtype = draw(st.sampled_from(LEAF_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.normal(size=shape) * (rng.random(shape) < draw(st.sampled_from([0.0, 0.3, 1.0])))
    return values.astype(dtype) if dtype != "bool" else values != 0


KEYS = st.one_of(st.text(max_size=4), st.integers(-(2**31), 2**31 - 1))
TREES = st.recursive(
    st.one_of(st.none(), leaves()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), children, max_size=3),
        st.dictionaries(st.integers(-(2**31), 2**31 - 1), children, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_loads_of_dumps_keeps_structure_none_and_empty_containers(tree):
    # Dict keys are sorted by the writer (jax's flattening order), so compare against that.
    expected = normalized(jax.tree.map(lambda x: x, tree, is_leaf=lambda x: x is None))
    assert_same_tree(archive.loads(archive.dumps(tree)), expected)


@pytest.mark.parametrize(
    "tree",
    [None, {}, [], (), {"a": None}, [None], [1.0, None], {"a": {}, "b": []}, [[], [[]]]],
    ids=repr,
)
def test_none_and_empty_containers_round_trip(tree):
    tree = jax.tree.map(np.float32, tree)
    assert_same_tree(archive.loads(archive.dumps(tree)), normalized(tree))


def test_a_pruning_mask_with_none_at_unselected_leaves_zips_with_its_params_again():
    params = {"fc1": {"kernel": np.ones((3, 2), np.float32), "bias": np.ones(2, np.float32)}}
    masks = {"fc1": {"kernel": np.array([[1, 0], [0, 1], [1, 1]], bool), "bias": None}}
    restored = archive.loads(archive.dumps(masks))
    assert restored["fc1"]["bias"] is None
    pruned = jax.tree.map(
        lambda m, p: p if m is None else np.where(m, p, 0),
        restored,
        params,
        is_leaf=lambda x: x is None,
    )
    np.testing.assert_array_equal(pruned["fc1"]["kernel"], masks["fc1"]["kernel"])


def test_writer_refuses_what_the_reader_would_refuse():
    leaf = np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"integer dict keys must lie in \[-2\*\*31, 2\*\*31\)"):
        archive.dumps({2**31: leaf})
    deep = leaf
    for _ in range(archive.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(ValueError, match="exceed the archive reader's limits: .*deeper than 64"):
        archive.dumps(deep)
    with pytest.raises(ValueError, match="exceed the archive reader's limits: .*JSON values"):
        archive.dumps(leaf, metadata={"zeros": [0] * archive.MAX_HEADER_NODES})
    nan = Codebook(np.array([np.nan, 1.0], np.float32), np.zeros(2, np.uint8), np.ones(2, bool))
    with pytest.raises(ValueError, match="centroids that are not finite in float32"):
        archive.dumps({"w": leaf}, codebooks={"w": nan})
    big = Codebook(np.array([1e5], np.float32), np.zeros(2, np.uint8), np.ones(2, bool))
    with pytest.raises(ValueError, match="overflow centroid_dtype=float16"):
        archive.dumps({"w": leaf}, codebooks={"w": big}, centroid_dtype="float16")


def test_format_spec_lists_what_a_reader_refuses():
    spec = (pathlib.Path(__file__).parent.parent / "docs" / "archive-format.md").read_text()
    for limit in (
        archive.MAX_HEADER_BYTES,
        archive.MAX_HEADER_NODES,
        archive.MAX_DEPTH,
        archive.DEFAULT_MAX_BYTES,
    ):
        assert f"2**{limit.bit_length() - 1}" in spec or f"{limit}" in spec, limit
    for refusal in ("`b1` byte", "complete", "shortest form", "filler", "finite", "max_bytes"):
        assert refusal in spec, refusal
