"""Deep Compression of LeNet-300-100 on the built-in digits, in one call.

``jaxopt_nn.deep_compress`` trains the model, prunes it gradually with
retraining, shares its weights through k-means codebooks with centroid
fine-tuning, and writes a Huffman-coded archive. The report gives the
per-layer table (as Table 2 of Han et al. 2016), the accuracy and size after
every stage, and a summary line. The archive is then read back with
``jaxopt_nn.archive.load``: its kernels are the report's shared weights and
give the reported accuracy.

With the defaults (30 dense, 60 pruning, 15 fine-tuning epochs) this takes
about 10 seconds on 2 CPU cores.

Run: ``python examples/deep_compression.py [ARCHIVE]`` (default: a file in a
temporary directory).
"""

import os
import sys
import tempfile

import numpy as np
from flax import nnx

import jaxopt_nn

LAYERS = ("fc1", "fc2", "fc3")


def main(path):
    data = jaxopt_nn.load_digits()
    model = jaxopt_nn.LeNet300100(64, rngs=nnx.Rngs(0))
    report = jaxopt_nn.deep_compress(model, data, path=path, progress=False)
    print(report.table(), report.stage_table(), report.summary(), sep="\n\n")

    stored = jaxopt_nn.archive.load(path)  # nested dicts of NumPy arrays
    kernels = np.concatenate([stored["params"][layer]["kernel"].ravel() for layer in LAYERS])
    print(f"\n{path}: {os.path.getsize(path):,} bytes, kernels equal the report's shared "
          f"weights: {np.array_equal(kernels, report.weights['shared'])}")  # fmt: skip
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, stored["params"])
    nnx.update(model, params)  # the untouched input model now holds the archive's weights
    accuracy = np.mean(np.argmax(model(data.x_test), -1) == data.y_test)
    print(f"test accuracy of the loaded weights: {accuracy:.2%}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as directory:
            main(os.path.join(directory, "lenet300100.jnz"))
