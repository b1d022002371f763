"""Crafted archives (valid CRC32s) are refused, or loaded correctly, within bounds.

Each file is read in a forked child of a warm worker (``worker.py``): by
``archive.load``, ``archive.inspect`` and ``jaxopt-nn inspect``, each within
2 CPU seconds and 300 MiB of peak memory above a bare child (``bounds.py``).
"""

import re

import numpy as np
import pytest

from jaxopt_nn import archive

from . import crafted
from .bounds import assert_cheap, assert_refused

READERS = ["load", "inspect", "cli"]


def read(bounded, reader, blob):
    if reader == "cli":
        return bounded.run("cli", blob, "inspect", "{path}")
    return bounded.run(reader, blob)


def assert_refused_by(reply, reader, match):
    """``load``/``inspect`` raise an ArchiveError; the CLI prints one error line, exit 1."""
    if reader != "cli":
        assert_refused(reply, match)
        return
    assert_cheap(reply)
    result = reply["result"]
    assert result["rc"] == 1, reply
    assert result["stdout"] == ""
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxopt-nn inspect: error: "), lines
    assert re.search(match, lines[0]), (match, lines[0])


HOSTILE = {
    # header bombs
    "64 MiB of [{},{},...] from 65 KB": (
        lambda: crafted.empty_dicts_header(22_000_000),
        r"inflates to more than 16,777,216 bytes",
    ),
    "5.6M empty dicts within the byte limit": (
        lambda: crafted.empty_dicts_header(5_500_000),
        rf"may hold 11,000,001 JSON values; this reader accepts at most "
        rf"{archive.MAX_HEADER_NODES:,}",
    ),
    "40,000 integer keys hashing to 0": (
        lambda: crafted.colliding_int_keys(40_000),
        r"keys are strings or integers in \[-2\*\*31, 2\*\*31\)",
    ),
    "40,000 keys plus a duplicate (object)": (
        lambda: crafted.duplicate_last_key(40_000, mapping_form=False),
        r"key 'k39999' appears twice in a JSON object",
    ),
    "40,000 keys plus a duplicate (mapping)": (
        lambda: crafted.duplicate_last_key(40_000, mapping_form=True),
        r"key 'k39999' appears twice in the mapping",
    ),
    "100,000-deep nesting": (lambda: crafted.deep_nesting(100_000), r"header is malformed"),
    "65-deep nesting": (lambda: crafted.deep_nesting(66), r"nests deeper than 64 levels"),
    # declared sizes
    "8 float64 tensors of 2**31 elements in 117 bytes": (
        crafted.huge_sparse_tensors,
        r"decodes to 137,438,953,472 bytes, more than max_bytes=4,294,967,296",
    ),
    # canonical encodings
    "raw bool byte 0x02": (lambda: crafted.raw_bool(2), r"a bool byte other than 0 or 1"),
    "sparse bool byte 0x02": (lambda: crafted.sparse_bool(2), r"bool byte above 1"),
    "sparse value 0 (never kept)": (lambda: crafted.sparse_bool(0), r"a kept value is zero"),
    "int8 leaf stored as float64 NaN": (
        lambda: crafted.int_leaf_stored_as_float(np.nan),
        r"dtype fields \['i1', 'f8'\], which the writer never writes",
    ),
    "int8 leaf stored as float64 1e300": (
        lambda: crafted.int_leaf_stored_as_float(1e300),
        r"dtype fields \['i1', 'f8'\]",
    ),
    "codebook of int32 leaf": (
        lambda: crafted.codebook("i4", np.array([1.0, 2.0], np.float32)),
        r"codebook tensor 'w' has dtype i4; codebook leaves are floating",
    ),
    "codebook of bool leaf": (
        lambda: crafted.codebook("b1", np.array([1.0], np.float32)),
        r"codebook tensor 'w' has dtype b1",
    ),
    "NaN centroid": (
        lambda: crafted.codebook(None, np.array([1.0, np.nan], np.float32)),
        r"a centroid is not finite in float32",
    ),
    "inf centroid": (
        lambda: crafted.codebook(None, np.array([np.inf], np.float16)),
        r"a centroid is not finite",
    ),
    "float64 centroid 1e300 in a float16 leaf": (
        lambda: crafted.codebook("f2", np.array([1.0, 1e300])),
        r"a centroid is not finite in float16",
    ),
    # streams
    "position outside the tensor": (
        crafted.position_out_of_range,
        r"kept position 9 outside a tensor of 4",
    ),
    "position stream ending with a filler": (
        crafted.trailing_filler,
        r"position stream ends with a filler symbol",
    ),
    "incomplete code (lengths 1 and 15)": (
        crafted.incomplete_code,
        r"not those of an optimal \(complete\) prefix code",
    ),
    "10-byte varint": (crafted.huge_varint, r"malformed variable-length integer"),
    "bitmap with a padding bit set": (crafted.bitmap_padding, r"padding bits must be zero"),
    "bitmap positions in a version 1 file": (
        crafted.bitmap_in_version_1,
        r"index width 0 not in \[1, 16\]",
    ),
    "fixed-width stream wider than its largest symbol": (
        crafted.fixed_too_wide,
        r"fixed width 3 is not the width of its largest symbol 1",
    ),
    "fixed-width stream of 2**62 symbols in 2 bytes": (
        crafted.fixed_past_its_section,
        r"needs \d+ more bytes",
    ),
    "bitmap of 2**30 bits in 1 byte": (crafted.bitmap_past_its_section, r"needs \d+ more bytes"),
    "overlong varint": (crafted.overlong_varint, r"not in its shortest form"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_is_refused_cheaply(bounded, builds, case, reader):
    match = HOSTILE[case][1]
    assert_refused_by(read(bounded, reader, builds(case)), reader, match)


@pytest.fixture(scope="module")
def builds():
    """Each crafted file is built once, for all three readers."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = HOSTILE[case][0]()
        return cache[case]

    return get


def test_crafted_header_bomb_is_small_and_valid():
    blob = crafted.empty_dicts_header(22_000_000)
    assert len(blob) < 70_000  # 64 MiB of JSON in under 70 KB
    with pytest.raises(archive.ArchiveError, match="inflates to more than"):
        archive.loads(blob)


def test_the_largest_header_the_reader_accepts_loads_cheaply(bounded):
    blob = crafted.widest_accepted_header()
    tree = archive.loads(blob)
    assert tree and set(map(len, tree)) == {0}
    reply = bounded.run("load", blob)
    assert reply["ok"], reply
    assert_cheap(reply)
    with pytest.raises(archive.ArchiveError, match=f"accepts at most {archive.MAX_HEADER_NODES:,}"):
        archive.loads(crafted.widest_accepted_header(extra=1))


def test_in_range_int_keys_sharing_low_bits_load_cheaply(bounded):
    blob = crafted.int_keys_sharing_low_bits(40_000)
    tree = archive.loads(blob)
    assert len(tree) == 40_000 and set(tree.values()) == {None}
    reply = bounded.run("load", blob)
    assert reply["ok"], reply
    assert_cheap(reply)


def test_many_one_bit_streams_load_correctly_and_cheaply(bounded):
    blob = crafted.many_one_bit_streams(100, 4096)
    assert len(blob) < 110_000
    tree = archive.loads(blob)
    expected = np.full(4096, 1.5, np.float32)
    assert len(tree) == 100
    for leaf in tree.values():
        np.testing.assert_array_equal(leaf, expected)
    for reader in ("load", "inspect"):
        reply = bounded.run(reader, blob)
        assert reply["ok"], reply
        assert_cheap(reply)
    assert reply["result"]["table"].count("codebook") == 100


def test_a_long_bitmap_loads_correctly_and_cheaply(bounded):
    blob = crafted.long_bitmap(2**23)  # 2 MiB: 8M weights, every one kept
    tree = archive.loads(blob)
    np.testing.assert_array_equal(np.unique(tree["w"]), [1.5])
    for reader in ("load", "inspect"):
        reply = bounded.run(reader, blob)
        assert reply["ok"], reply
        assert_cheap(reply)


def test_thousands_of_15_bit_code_tables_load_cheaply(bounded):
    blob = crafted.long_code_tables(2000)  # 53 KB
    reply = bounded.run("load", blob)
    assert reply["ok"], reply
    assert reply["result"] == {"leaves": 2000, "nbytes": 8000, "sum": 2000.0}
    assert_cheap(reply)


def test_huge_declared_tensors_are_accounted_cheaply_with_no_limit(bounded):
    info = archive.inspect(crafted.huge_sparse_tensors(), max_bytes=None)
    assert [t.size for t in info.tensors] == [2**31] * 8
    assert sum(t.kept for t in info.tensors) == 0


@pytest.mark.parametrize("reader", ["inspect", "cli"])
def test_control_characters_in_names_and_metadata_are_escaped(bounded, reader):
    blob = crafted.escape_names()
    reply = read(bounded, reader, blob)
    assert reply["ok"], reply
    assert_cheap(reply)
    text = reply["result"]["table"] if reader == "inspect" else reply["result"]["stdout"]
    assert "\x1b" not in text and "\x07" not in text
    assert r"\x1b[2J\x1b]0;pwned\x07" in text
    assert r"ok\n| forged | row" in text
    lines = text.splitlines()
    assert sum("forged" in line for line in lines) == 1
    if reader == "cli":
        assert r"metadata: model\x1b[31m=\x1b[5mblink" in text


def test_error_messages_escape_names(bounded):
    blob = crafted.one_tensor(["r", [3], "b1"], bytes([1, 0, 2]), name="\x1b[2Jw")
    reply = bounded.run("cli", blob, "inspect", "{path}")
    assert reply["result"]["rc"] == 1
    assert "\x1b" not in reply["result"]["stderr"]
    assert r"\x1b[2Jw" in reply["result"]["stderr"]


def test_max_bytes_is_checked_before_reading_and_exposed_by_the_cli(bounded):
    blob = archive.dumps({"w": np.ones(1000, np.float32)})
    with pytest.raises(archive.ArchiveError, match=r"4,000 bytes, more than max_bytes=3,999"):
        archive.loads(blob, max_bytes=3999)
    assert archive.loads(blob, max_bytes=4000)["w"].shape == (1000,)
    reply = bounded.run("cli", blob, "inspect", "{path}", "--max-bytes", "3999")
    assert reply["result"]["rc"] == 1
    assert "more than max_bytes=3,999" in reply["result"]["stderr"]
    reply = bounded.run("cli", blob, "inspect", "{path}", "--max-bytes", "4K")
    assert reply["result"]["rc"] == 0
    with pytest.raises(ValueError, match="max_bytes must be None or a non-negative integer"):
        archive.loads(blob, max_bytes=-1)


@pytest.mark.parametrize(
    "case", ["64 MiB of [{},{},...] from 65 KB", "8 float64 tensors of 2**31 elements in 117 bytes"]
)
def test_evaluate_refuses_a_hostile_archive_in_one_line(bounded, builds, case):
    reply = bounded.run("cli", builds(case), "evaluate", "{path}", "--model", "lenet300")
    assert_cheap(reply)
    assert reply["result"]["rc"] == 1
    lines = reply["result"]["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxopt-nn evaluate: error: archive"), lines
    assert re.search(HOSTILE[case][1], lines[0]), lines


def test_the_max_bytes_option_parses_byte_counts():
    import argparse

    from jaxopt_nn import cli

    parse = cli._byte_count
    assert [parse(t) for t in ("none", "1000", "4K", "512M", "16GiB", "2gb")] == [
        None,
        1000,
        4 << 10,
        512 << 20,
        16 << 30,
        2 << 30,
    ]
    for bad in ("", "-1", "4x", "1.5G", "G"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be 'none' or a byte count"):
            parse(bad)


def test_memory_per_file_byte_of_a_long_stream_is_small(bounded):
    # 2M one-bit symbols per stream (0.5 MB): decoding needs tens of bytes per file byte.
    blob = crafted.many_one_bit_streams(1, 1 << 21)
    reply = bounded.run("load", blob)
    assert reply["ok"], reply
    assert reply["result"] == {"leaves": 1, "nbytes": 4 << 21, "sum": 1.5 * (1 << 21)}
    assert_cheap(reply)
    per_byte = (reply["extra_mib"] * 2**20 - reply["result"]["nbytes"]) / len(blob)
    assert per_byte < 64, f"{per_byte:.0f} bytes of memory per file byte beyond the output"
