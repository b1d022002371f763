"""jaxopt_nn: pure-function transforms over Flax parameter pytrees.

Pruning, residual models, Adam/RMSprop as optax transforms, quantization,
Huffman packing into a compressed archive, and data/model parallelism.
"""

from jaxopt_nn import tree
from jaxopt_nn.tree import count_params
from jaxopt_nn.tree import path_name
from jaxopt_nn.tree import select
from jaxopt_nn.tree import size_summary

__version__ = "0.1.0"

__all__ = [
    "count_params",
    "path_name",
    "select",
    "size_summary",
    "tree",
]
