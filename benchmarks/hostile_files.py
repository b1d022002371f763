"""CPU time and peak memory of reading crafted (hostile) files, against a bare process.

Every crafted archive of the adversarial suite (``tests/adversarial``) is
read by ``archive.load``, ``archive.inspect`` and ``jaxopt-nn inspect``, each
in a child forked from a warm worker; the baseline is a bare child of the
same worker (``noop``), measured in the same run. Reported per case: the
outcome (refused / loaded), the largest CPU seconds and the largest peak
resident memory above the baseline over the three readers.

Usage: ``python benchmarks/hostile_files.py``; writes
``benchmarks/results/hostile_files.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the suite is the package ``adversarial``

from adversarial import crafted  # noqa: E402
from adversarial.bounds import Bounded  # noqa: E402
from adversarial.test_hostile_archives import HOSTILE  # noqa: E402

LOADED = {
    "largest accepted header (2**18 JSON values)": crafted.widest_accepted_header,
    "100 codebook tensors, 1-bit streams of 4096 symbols": crafted.many_one_bit_streams,
    "2000 tensors with 15-bit code tables": lambda: crafted.long_code_tables(2000),
    "40,000 int32 keys sharing their low 15 bits": lambda: crafted.int_keys_sharing_low_bits(
        40_000
    ),
}


def measure(runner: Bounded, name: str, blob: bytes) -> dict:
    replies = [
        runner.run("load", blob),
        runner.run("inspect", blob),
        runner.run("cli", blob, "inspect", "{path}"),
    ]
    refused = [not r["ok"] or r["result"].get("rc", 0) != 0 for r in replies]
    return {
        "case": name,
        "file_bytes": len(blob),
        "outcome": "refused" if all(refused) else "loaded" if not any(refused) else "mixed",
        "max_cpu_s": max(r["cpu_s"] for r in replies),
        "max_extra_mib": max(r["extra_mib"] for r in replies),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        runner = Bounded(directory)
        try:
            rows = [measure(runner, name, build()) for name, (build, _) in HOSTILE.items()]
            rows += [measure(runner, name, build()) for name, build in LOADED.items()]
        finally:
            runner.close()
    print(f"baseline (bare forked child): {runner.baseline_mib:.0f} MiB resident")
    print(f"{'case':<56} {'bytes':>9} {'outcome':>8} {'CPU s':>6} {'+MiB':>6}")
    for row in rows:
        print(
            f"{row['case']:<56} {row['file_bytes']:>9,} {row['outcome']:>8} "
            f"{row['max_cpu_s']:>6.2f} {row['max_extra_mib']:>6.1f}"
        )
    worst_cpu = max(r["max_cpu_s"] for r in rows)
    worst_mib = max(r["max_extra_mib"] for r in rows)
    print(f"worst: {worst_cpu:.2f} CPU s, {worst_mib:.1f} MiB above the baseline")
    out = os.path.join(HERE, "results", "hostile_files.json")
    with open(out, "w") as file:
        json.dump(
            {
                "machine": platform.platform(),
                "python": platform.python_version(),
                "baseline_mib": runner.baseline_mib,
                "rows": rows,
                "worst_cpu_s": worst_cpu,
                "worst_extra_mib": worst_mib,
            },
            file,
            indent=1,
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
