"""Huffman coding and the sparse archive vs dahuffman, zlib-9 and lzma, on the same data.

(a) 1M Laplace-distributed values quantized to 32 levels: bits per symbol vs the
    entropy and the Huffman optimum, encode/decode speed in MSym/s; our
    decoder runs in NumPy and, as ``backend="jax"``, jitted on JAX's device.
(b) a 1000x1000 weight tensor, 90% pruned, 5-bit shared weights: bits per
    weight of our sparse coding (relative indices + codebook indices, both
    Huffman-coded, as stored by ``jaxopt_nn.archive``) vs the dense index
    stream compressed by each baseline.

Every method runs in every round, rounds interleaved (within a round a fast call
repeats for 0.2 s and the mean is taken); medians over rounds are reported.
Usage: ``python benchmarks/huffman.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import statistics
import time
import zlib

import dahuffman
import jax
import numpy as np

from jaxopt_nn import archive, huffman
from jaxopt_nn.quantization import Codebook


def entropy_bits(symbols: np.ndarray) -> float:
    p = np.bincount(symbols) / symbols.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def timed(fn, budget: float = 0.2):
    """Result and mean seconds per call; fast calls repeat back to back for ``budget`` s.

    Every method is timed the same way, so caches are as warm for the
    baselines as for ours; slow calls (dahuffman) run once.
    """
    calls, start = 0, time.perf_counter()
    while True:
        result = fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            return result, elapsed / calls


def laplace_symbols(n: int, rng: np.random.Generator) -> np.ndarray:
    return (np.clip(np.round(rng.laplace(0.0, 3.0, n)), -16, 15) + 16).astype(np.uint8)


def pruned_codebook(shape, rng: np.random.Generator) -> Codebook:
    """90% pruned, 5-bit codebook with a bell-shaped index histogram (as k-means gives)."""
    mask = rng.random(shape) < 0.1
    indices = np.clip(np.round(rng.normal(15.5, 5.0, shape)), 0, 31).astype(np.uint8)
    centroids = np.linspace(-0.2, 0.2, 32, dtype=np.float32)
    return Codebook(centroids, np.where(mask, indices, 0).astype(np.uint8), mask)


def ours_stream(symbols: np.ndarray, backend: str):
    """Encode/decode functions and the stored size (code table + chunk index + payload)."""
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=32))

    def encode():
        return huffman.encode(symbols, lengths)

    def decode(stream):
        return jax.block_until_ready(huffman.decode(stream, lengths, symbols.size, backend=backend))

    def size(stream):  # 4-bit code lengths, 2-byte chunk bit lengths, payload
        return (lengths.size + 1) // 2 + 2 * (stream.chunk_offsets.size - 1) + len(stream.data)

    return encode, decode, size


def methods_for(symbols: np.ndarray):
    """name -> (encode() -> blob, decode(blob) -> symbols, size(blob) -> bytes)."""
    raw = symbols.tobytes()
    codec = dahuffman.HuffmanCodec.from_data(symbols.tolist())
    return {
        "ours": ours_stream(symbols, "numpy"),
        "ours (JAX decode)": ours_stream(symbols, "jax"),
        "dahuffman": (
            lambda: codec.encode(symbols.tolist()),
            codec.decode,
            len,  # payload only: its code table is not counted
        ),
        "zlib-9": (lambda: zlib.compress(raw, 9), zlib.decompress, len),
        "lzma": (lambda: lzma.compress(raw, preset=9), lzma.decompress, len),
    }


def check(name, decoded, symbols):
    if name == "dahuffman":
        decoded = np.array(decoded)
    elif isinstance(decoded, bytes):
        decoded = np.frombuffer(decoded, np.uint8)
    if not np.array_equal(np.asarray(decoded), symbols):
        raise AssertionError(f"{name} did not round-trip")


def run_case(symbols: np.ndarray, rounds: int, extra: dict | None = None) -> dict:
    methods = methods_for(symbols)
    methods.update(extra or {})
    times = {name: {"encode": [], "decode": []} for name in methods}
    sizes = {}
    for encode, decode, _ in methods.values():  # warm-up (compiles the JAX decode)
        decode(encode())
    for _ in range(rounds):
        for name, (encode, decode, size) in methods.items():
            blob, t_encode = timed(encode)
            decoded, t_decode = timed(lambda blob=blob, decode=decode: decode(blob))
            if name != "ours (archive)":
                check(name, decoded, symbols)
            times[name]["encode"].append(t_encode)
            times[name]["decode"].append(t_decode)
            sizes[name] = size(blob)
    n = symbols.size
    rows = {}
    for name in methods:
        encode_s = statistics.median(times[name]["encode"])
        decode_s = statistics.median(times[name]["decode"])
        rows[name] = {
            "bytes": sizes[name],
            "bits_per_symbol": 8 * sizes[name] / n,
            "encode_msym_s": n / encode_s / 1e6,
            "decode_msym_s": n / decode_s / 1e6,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200K symbols, 2 rounds")
    args = parser.parse_args()
    n, rounds = (200_000, 2) if args.quick else (1_000_000, 3)
    rng = np.random.default_rng(0)

    laplace = laplace_symbols(n, rng)
    lengths = huffman.code_lengths(np.bincount(laplace, minlength=32), max_length=24)
    case_a = {
        "symbols": n,
        "entropy_bits": entropy_bits(laplace),
        "huffman_optimum_bits": float(lengths[laplace].sum()) / n,
        "methods": run_case(laplace, rounds),
    }

    side = int(round(n**0.5))
    codebook = pruned_codebook((side, side), rng)
    dense = np.where(codebook.mask, codebook.indices + 1, 0).astype(np.uint8).reshape(-1)
    leaf = {"w": np.zeros((side, side), np.float32)}

    def archive_decode(blob):
        restored = archive.loads(blob)["w"]
        expected = np.where(codebook.mask, codebook.centroids[codebook.indices], 0)
        if not np.array_equal(restored, expected):
            raise AssertionError("archive did not round-trip")
        return restored

    sparse_method = {
        "ours (archive)": (
            lambda: archive.dumps(leaf, codebooks={"w": codebook}),
            archive_decode,
            len,
        )
    }
    info = archive.inspect(archive.dumps(leaf, codebooks={"w": codebook})).tensors[0]
    case_b = {
        "weights": dense.size,
        "kept_fraction": float(codebook.mask.mean()),
        "dense_stream_entropy_bits": entropy_bits(dense),
        "archive_index_bits_per_kept": info.index_bits,
        "archive_weight_bits_per_kept": info.weight_bits,
        "methods": run_case(dense, rounds, sparse_method),
    }
    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, numpy {np.__version__}",
        "quick": args.quick,
        "rounds": rounds,
        "laplace_32": case_a,
        "pruned_5bit": case_b,
    }
    dahuffman_decode = case_a["methods"]["dahuffman"]["decode_msym_s"]
    results["decode_speedup_vs_dahuffman"] = (
        case_a["methods"]["ours"]["decode_msym_s"] / dahuffman_decode
    )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", "huffman.json")
    with open(out, "w") as file:
        json.dump(results, file, indent=2)

    for title, case, reference in [
        (
            "(a) Laplace, 32 symbols",
            case_a,
            f"entropy {case_a['entropy_bits']:.3f} bits, "
            f"Huffman optimum {case_a['huffman_optimum_bits']:.3f} bits",
        ),
        (
            "(b) 90% pruned, 5-bit",
            case_b,
            f"dense stream entropy {case_b['dense_stream_entropy_bits']:.3f} bits/weight",
        ),
    ]:
        print(f"{title}: {reference}")
        print(f"  {'method':18s} {'bits/sym':>9s} {'enc MSym/s':>11s} {'dec MSym/s':>11s}")
        for name, row in case["methods"].items():
            print(
                f"  {name:18s} {row['bits_per_symbol']:9.3f} {row['encode_msym_s']:11.2f} "
                f"{row['decode_msym_s']:11.2f}"
            )
    print(f"decode speed-up vs dahuffman: {results['decode_speedup_vs_dahuffman']:.0f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
