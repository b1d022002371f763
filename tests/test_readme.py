"""The README's example runs as printed."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_writes_a_pruned_shared_archive(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "import jaxopt_nn as jn" in b)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "fc1/kernel" in out and "codebook" in out
    from jaxopt_nn import archive

    kernel = archive.load(tmp_path / "lenet.jnz")["fc1"]["kernel"]
    assert np.sum(kernel == 0) == round(0.9 * kernel.size)
    assert len(np.unique(kernel[kernel != 0])) <= 2**5
