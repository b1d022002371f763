"""Every benchmark script still imports (its top level runs; ``main`` does not).

The scripts import library internals and test helpers (``hostile_files.py``
reads the crafted-file suite), so a rename elsewhere breaks them silently;
this runs each one's top level in a fresh interpreter, under a name other
than ``__main__``.
"""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

IMPORT_ALL = """
import runpy, sys, traceback
failed = []
for path in sys.argv[1:]:
    try:
        runpy.run_path(path, run_name="benchmark_import_check")
    except BaseException:
        failed.append(path)
        traceback.print_exc()
print("FAILED:", failed)
sys.exit(1 if failed else 0)
"""


def test_every_benchmark_script_imports():
    scripts = sorted(str(p) for p in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 9, scripts
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, *scripts],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
