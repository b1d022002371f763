"""Quantize a trained LeNet-300-100: uniform, quantization-aware, k-means with bit packing.

1. Post-training uniform quantization with one scale per output channel
   (``quantize_tree(..., axis=-1)``): every weight comes back within half a
   step, ``|w - dequantize(q)| <= scale / 2``; test accuracy per bit width.
2. Quantization-aware training: ``fake_quant_tree`` as the
   ``param_transform`` of ``fit_state`` trains the float weights through
   fake-quantized kernels (straight-through gradient) for a few epochs; then
   ``quantize_tree`` with the same arguments gives the weights the loss saw.
3. k-means weight sharing (``kmeans_tree``: 16 shared values per kernel)
   with ``pack_bits``: the 4-bit indices take half a byte per weight,
   checked to unpack exactly.

Run: ``python examples/quantize_and_pack.py`` (about 15 seconds on a CPU).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxopt_nn

QAT_BITS, SHARED_BITS = 2, 4


def main():
    data = jaxopt_nn.load_digits()
    tx = jaxopt_nn.adam(1e-3)
    result = jaxopt_nn.fit(
        jaxopt_nn.LeNet300100(64, rngs=nnx.Rngs(0)), tx, data, epochs=15, progress=False
    )
    graphdef, state = result.graphdef, result.state
    params = state.params

    def accuracy(params):
        test = jaxopt_nn.evaluate(graphdef, state._replace(params=params), data.x_test, data.y_test)
        return test["accuracy"]

    print(f"float32 test accuracy {accuracy(params):.2%}\n")

    # 1. Uniform per-channel quantization, checked against its error bound.
    kernels = {n: w for n, w in jaxopt_nn.tree.leaves_with_names(params) if w.ndim >= 2}
    rows = []
    for bits in (8, 4, 3, 2):
        ratio = 0.0  # worst |w - w_hat| / (scale / 2) over every kernel: at most 1
        for w in kernels.values():
            q = jaxopt_nn.quantize(w, bits, axis=-1)  # scale, zero_point: (1, out_channels)
            error = jnp.abs(w - jaxopt_nn.dequantize(q))
            ratio = max(ratio, float(jnp.max(error / (q.scale / 2))))
        restored = jaxopt_nn.dequantize_tree(jaxopt_nn.quantize_tree(params, bits, axis=-1))
        rows.append([bits, f"{ratio:.6f}", f"{accuracy(restored):.2%}"])
    print(jaxopt_nn.tree.format_table(["bits", "max error / (scale / 2)", "test accuracy"], rows))

    # 2. Quantization-aware training at QAT_BITS, starting from the float weights.
    fake_quant = functools.partial(jaxopt_nn.fake_quant_tree, bits=QAT_BITS, axis=-1)
    copies = jax.tree.map(jnp.copy, (params, state.rest))  # fit_state donates its state
    start = jaxopt_nn.TrainState(*copies, tx.init(params))
    qat = jaxopt_nn.fit_state(
        graphdef, start, tx, data, epochs=3, param_transform=fake_quant, progress=False
    )
    quantized = jaxopt_nn.quantize_tree(qat.state.params, QAT_BITS, axis=-1)
    print(f"\n{QAT_BITS}-bit QAT, 3 epochs: test accuracy {qat.history[-1]['test_accuracy']:.2%} "
          f"with fake quantization, {accuracy(jaxopt_nn.dequantize_tree(quantized)):.2%} "
          f"with the quantize_tree weights")  # fmt: skip

    # 3. k-means weight sharing, indices packed SHARED_BITS to a weight.
    books = jaxopt_nn.kmeans_tree(params, SHARED_BITS)
    rows = []
    for name, book in books.items():
        packed = jaxopt_nn.pack_bits(book.indices, SHARED_BITS)
        unpacked = jaxopt_nn.unpack_bits(packed, SHARED_BITS, book.indices.size)
        assert np.array_equal(unpacked, np.asarray(book.indices).ravel())
        rows.append([name, 4 * book.indices.size, packed.nbytes, book.centroids.nbytes])
    total = np.sum([row[1:] for row in rows], axis=0).tolist()
    rows = [[*row, f"{row[1] / (row[2] + row[3]):.1f}x"] for row in [*rows, ["total", *total]]]
    headers = ["kernel", "float32 bytes", "packed indices", "codebook", "compression"]
    print(f"\nk-means, {2**SHARED_BITS} shared values per kernel: test accuracy "
          f"{accuracy(jaxopt_nn.share_weights(params, books)):.2%}")  # fmt: skip
    print(jaxopt_nn.tree.format_table(headers, rows))


if __name__ == "__main__":
    main()
