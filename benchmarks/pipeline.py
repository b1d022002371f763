"""Deep Compression of LeNet-300-100 on digits: our archive vs generic compressors.

For each seed, :func:`jaxopt_nn.pipeline.deep_compress` runs with its
defaults. In the same run the final (pruned, shared) weights are also stored
the way a hand-rolled script would: ``np.savez_compressed`` of the float32
arrays, and lzma (preset 9 | extreme) of their raw bytes. Reported: the
compression of each (float32 bytes of all params / stored bytes), accuracy
of the dense model and of the archive, and wall time.

Usage: ``python benchmarks/pipeline.py [--seeds 0 1 2] [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import platform
import statistics
import time

import jax
import numpy as np
from flax import nnx

from jaxopt_nn import archive, pipeline
from jaxopt_nn.data import load_digits
from jaxopt_nn.models import LeNet300100


def baselines(path: str) -> dict[str, int]:
    """Bytes of the same weights under generic compressors."""
    stored = archive.load(path)
    leaves = {
        "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v, np.float32)
        for p, v in jax.tree_util.tree_flatten_with_path(stored)[0]
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **leaves)
    raw = b"".join(v.tobytes() for v in leaves.values())
    return {
        "savez_compressed": len(buffer.getvalue()),
        "lzma": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="one seed, short training")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    short = {"epochs": 5, "prune_epochs": 6, "finetune_epochs": 2} if args.quick else {}
    data = load_digits()
    out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    runs = []
    for seed in seeds:
        path = os.path.join(out_dir, f"lenet300-digits-seed{seed}.jnz")
        start = time.perf_counter()
        report = pipeline.deep_compress(
            LeNet300100(64, rngs=nnx.Rngs(seed)),
            data,
            seed=seed,
            path=path,
            progress=False,
            **short,
        )
        seconds = time.perf_counter() - start
        other = baselines(path)
        os.remove(path)
        run = {
            "seed": seed,
            "seconds": seconds,
            "dense_accuracy": report.stage("dense").accuracy,
            "archive_accuracy": report.stage("archive").accuracy,
            "original_bytes": report.original_bytes,
            "archive_bytes": report.info.file_bytes,
            "compression": report.compression,
            "baseline_bytes": other,
            "baseline_compression": {k: report.original_bytes / v for k, v in other.items()},
            "report": report.to_dict(),
        }
        runs.append(run)
        print(report.table())
        print(report.summary(), f"({seconds:.1f} s)")
        print(
            "same weights: savez_compressed {:.1f}x, lzma {:.1f}x".format(
                *run["baseline_compression"].values()
            )
        )
    summary = {
        "median_compression": statistics.median(r["compression"] for r in runs),
        "median_accuracy_drop_points": statistics.median(
            100 * (r["dense_accuracy"] - r["archive_accuracy"]) for r in runs
        ),
        "max_accuracy_drop_points": max(
            100 * (r["dense_accuracy"] - r["archive_accuracy"]) for r in runs
        ),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
    }
    print(json.dumps(summary, indent=2))
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "devices": str(jax.devices()),
        },
        "quick": args.quick,
        "summary": summary,
        "runs": runs,
    }
    with open(os.path.join(out_dir, "pipeline.json"), "w") as file:
        json.dump(result, file, indent=1)


if __name__ == "__main__":
    main()
