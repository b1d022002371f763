"""Smoke tests of the example scripts: each runs in-process and its output is checked."""

import math
import os
import re
import runpy
import sys

import numpy as np
import pytest

from jaxopt_nn import archive

ONE_TEST_EXAMPLE = 100 / 450 + 0.01  # percentage points of one digits test example (+ rounding)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, monkeypatch, capsys, *args):
    """Run ``examples/<name>`` as ``__main__`` with ``args``; return (globals, stdout)."""
    path = os.path.join(EXAMPLES, name)
    monkeypatch.setattr(sys, "argv", [path, *map(str, args)])
    namespace = runpy.run_path(path, run_name="__main__")
    return namespace, capsys.readouterr().out


def number(text):
    return float(text.replace(",", "").rstrip("%x"))


def table_rows(out, first):
    """Cells (split on 2+ spaces) of the table whose header starts with ``first``.

    The table ends at a blank line or after its ``total`` row.
    """
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
        if rows[-1][0] == "total":
            break
    return rows


def test_deep_compression(monkeypatch, capsys, tmp_path):
    path = tmp_path / "model.jnz"
    _, out = run_example("deep_compression.py", monkeypatch, capsys, path)

    summary = re.search(r"compression ([\d.]+)x, accuracy ([\d.]+)% -> ([\d.]+)%", out)
    compression, dense, final = map(float, summary.groups())
    assert compression > 30
    assert final > 85 and dense > 90
    # The file on disk is the one the report describes.
    info = archive.inspect(path)
    assert path.stat().st_size == info.file_bytes
    total = table_rows(out, "layer")[-1]
    assert total[0] == "total" and number(total[-2]) == info.file_bytes
    stages = {row[0]: row for row in table_rows(out, "stage")}
    assert list(stages) == ["dense", "pruned", "shared", "archive"]
    assert number(stages["archive"][2]) == info.file_bytes
    np.testing.assert_allclose(number(stages["archive"][1]), final, atol=0.01)
    # Loaded back: the kernels are the report's and give the reported accuracy.
    assert (
        f"{path}: {info.file_bytes:,} bytes, kernels equal the report's shared weights: True" in out
    )
    loaded = re.search(r"test accuracy of the loaded weights: ([\d.]+)%", out)
    np.testing.assert_allclose(float(loaded.group(1)), final, atol=ONE_TEST_EXAMPLE)


def test_prune_with_optax(monkeypatch, capsys):
    namespace, out = run_example("prune_with_optax.py", monkeypatch, capsys)
    target = namespace["SPARSITY"]

    epochs = re.findall(r"kernel sparsity ([\d.]+)%, test accuracy ([\d.]+)%", out)
    sparsities = [float(s) / 100 for s, _ in epochs]
    assert sparsities[0] == 0.0 and sparsities == sorted(sparsities)
    np.testing.assert_allclose(sparsities[-1], target, atol=1e-3)
    assert float(epochs[-1][1]) > 90

    rows = table_rows(out, "name")
    assert [row[0] for row in rows] == ["fc1/kernel", "fc2/kernel", "fc3/kernel", "total"]
    for name, size, nonzeros, sparsity in rows:
        size, nonzeros = int(number(size)), int(number(nonzeros))
        assert size - nonzeros == round(target * size) or name == "total"
        np.testing.assert_allclose(number(sparsity) / 100, 1 - nonzeros / size, atol=5e-5)
        if name != "total":
            assert f"{name}: {size - nonzeros} pruned, all exactly 0.0: True" in out

    export = re.search(r"BCOO kernels: ([\d,]+) bytes \(dense float32 ([\d,]+)\), .* = (\S+)", out)
    sparse_bytes, dense_bytes, diff = map(number, export.groups())
    nonzeros = int(number(rows[-1][2]))
    assert sparse_bytes == nonzeros * (4 + 2 * 4)  # float32 value + two int32 indices
    assert dense_bytes == 4 * int(number(rows[-1][1]))
    assert diff < 1e-4


def test_quantize_and_pack(monkeypatch, capsys):
    namespace, out = run_example("quantize_and_pack.py", monkeypatch, capsys)
    float_accuracy = number(re.search(r"float32 test accuracy ([\d.]+%)", out).group(1))

    uniform = {int(row[0]): (float(row[1]), number(row[2])) for row in table_rows(out, "bits")}
    assert sorted(uniform) == [2, 3, 4, 8]
    for ratio, _ in uniform.values():
        assert 0.5 < ratio <= 1 + 1e-5  # |w - w_hat| <= scale / 2, and the bound is nearly met
    assert abs(uniform[8][1] - float_accuracy) <= 1.0

    bits = namespace["QAT_BITS"]
    qat = re.search(
        rf"{bits}-bit QAT, 3 epochs: test accuracy ([\d.]+)% with fake quantization, "
        r"([\d.]+)% with the quantize_tree weights",
        out,
    )
    fake, real = map(float, qat.groups())
    # quantize_tree gives the weights the loss saw (up to float32 rounding)
    np.testing.assert_allclose(fake, real, atol=ONE_TEST_EXAMPLE)
    assert real >= uniform[bits][1]  # QAT recovers (at least) what post-training 2 bits lost

    shared = namespace["SHARED_BITS"]
    rows = table_rows(out, "kernel")
    assert [row[0] for row in rows] == ["fc1/kernel", "fc2/kernel", "fc3/kernel", "total"]
    for _, dense, packed, codebook, compression in rows[:-1]:
        size = int(number(dense)) // 4
        assert int(number(packed)) == math.ceil(size * shared / 8)
        assert int(number(codebook)) == 4 * 2**shared
        np.testing.assert_allclose(
            number(compression), size * 4 / (number(packed) + number(codebook)), atol=0.05
        )
    totals = [sum(int(number(row[i])) for row in rows[:-1]) for i in (1, 2, 3)]
    assert [int(number(c)) for c in rows[-1][1:4]] == totals
    assert number(rows[-1][4]) > 32 / shared - 0.5
    kmeans = re.search(r"(\d+) shared values per kernel: test accuracy ([\d.]+)%", out)
    assert int(kmeans.group(1)) == 2**shared
    assert float(kmeans.group(2)) > float_accuracy - 3


@pytest.mark.parametrize(
    "name", ["deep_compression.py", "prune_with_optax.py", "quantize_and_pack.py"]
)
def test_example_has_docstring_and_main(name):
    with open(os.path.join(EXAMPLES, name)) as file:
        source = file.read()
    assert source.startswith('"""') and f"python examples/{name}" in source
    assert "def main(" in source and 'if __name__ == "__main__":' in source
