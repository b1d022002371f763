"""Flax NNX models: LeNet-300-100, LeNet-5, a small CNN, residual networks.

All models take batched NHWC inputs (``LeNet300100`` flattens anything) and
return logits of shape ``(batch, num_classes)``. Spatial sizes are derived
from ``in_shape`` with ``'SAME'`` padding where needed, so the convolutional
models also run on scikit-learn's 8x8 digits.

Train/eval mode: models with batch norm start in training mode (batch
statistics, running averages updated). ``model.eval()`` switches them to the
running averages; :mod:`jaxopt_nn.train` sets the mode itself in each step.

Auxiliary heads: ``ResNet(..., aux_heads=True)`` has one classifier (global
average pool + linear) after every stage but the last;
``model(x, return_aux=True)`` returns ``(logits, [aux_logits, ...])``, and
:func:`auxiliary_loss` combines the losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _out_size(size: int, window: int, stride: int, padding: str) -> int:
    """Spatial output size of a convolution or pooling window."""
    if padding == "SAME":
        return -(-size // stride)
    return max(0, -(-(size - window + 1) // stride))


def _check_padding(padding: str) -> None:
    if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID'; got padding={padding!r}")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {name}={value!r}")


def _check_in_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    in_shape = tuple(in_shape)
    if len(in_shape) != 3 or not all(isinstance(d, int) and d >= 1 for d in in_shape):
        raise ValueError(
            f"in_shape must be three positive ints (height, width, channels); "
            f"got in_shape={in_shape!r}"
        )
    return in_shape


class LeNet300100(nnx.Module):
    """LeNet-300-100: a fully connected ``in -> 300 -> 100 -> classes`` network.

    The network of LeCun et al. (1998) used in Deep Compression (Han et al.,
    2016). Inputs of any shape are flattened after the batch axis; ReLU
    activations.

    Args:
      in_features: number of input features (784 for MNIST, 64 for digits).
      num_classes: number of outputs.
      hidden: the two hidden widths.
      rngs: random number generators for the initialisation.

    Example:
      >>> model = LeNet300100(64, rngs=nnx.Rngs(0))
      >>> model.fc1.kernel.shape, model.fc3.bias.shape
      ((64, 300), (10,))
      >>> model(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)

    References:
      LeCun, Bottou, Bengio, Haffner, "Gradient-based learning applied to
      document recognition", https://doi.org/10.1109/5.726791, 1998.
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        *,
        hidden: Sequence[int] = (300, 100),
        rngs: nnx.Rngs,
    ):
        _check_positive("in_features", in_features)
        _check_positive("num_classes", num_classes)
        hidden = tuple(hidden)
        if len(hidden) != 2:
            raise ValueError(f"hidden must hold two widths; got hidden={hidden!r}")
        for width in hidden:
            _check_positive("hidden", width)
        self.fc1 = nnx.Linear(in_features, hidden[0], rngs=rngs)
        self.fc2 = nnx.Linear(hidden[0], hidden[1], rngs=rngs)
        self.fc3 = nnx.Linear(hidden[1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(batch, num_classes)`` of a batch ``(batch, ...)``."""
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.fc2(x))
        return self.fc3(x)


def _max_pool(x: jax.Array, padding: str) -> jax.Array:
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding=padding)


class LeNet5(nnx.Module):
    """LeNet-5 as in Caffe and Deep Compression: conv20 -> pool -> conv50 -> pool -> fc500 -> fc.

    5x5 convolutions and 2x2 max pooling with ReLU. With ``padding='VALID'``
    (the classic network, 431k parameters on 28x28 inputs) the input must be
    at least 16x16; ``padding='SAME'`` keeps the spatial size through the
    convolutions and rounds up in the pooling, so any input size works (8x8
    digits included). The size of ``fc1`` is derived from ``in_shape``.

    Args:
      in_shape: ``(height, width, channels)`` of one input.
      num_classes: number of outputs.
      padding: ``'VALID'`` or ``'SAME'``.
      rngs: random number generators for the initialisation.

    Raises:
      ValueError: if ``in_shape`` is too small for ``padding='VALID'``.

    Example:
      Shapes only (``nnx.eval_shape`` allocates nothing):

      >>> nnx.eval_shape(lambda: LeNet5(rngs=nnx.Rngs(0))).fc1.in_features
      800
      >>> small = lambda: LeNet5((8, 8, 1), padding='SAME', rngs=nnx.Rngs(0))
      >>> nnx.eval_shape(lambda: small()(jnp.zeros((2, 8, 8, 1)))).shape
      (2, 10)

    References:
      Han, Mao, Dally, "Deep Compression", https://arxiv.org/abs/1510.00149,
      2016 (Table 2); LeCun et al., https://doi.org/10.1109/5.726791, 1998.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (28, 28, 1),
        num_classes: int = 10,
        *,
        padding: str = "VALID",
        rngs: nnx.Rngs,
    ):
        height, width, channels = _check_in_shape(in_shape)
        _check_positive("num_classes", num_classes)
        _check_padding(padding)
        sizes = [height, width]
        for _ in range(2):
            sizes = [_out_size(_out_size(n, 5, 1, padding), 2, 2, padding) for n in sizes]
        if min(sizes) < 1:
            raise ValueError(
                f"in_shape={tuple(in_shape)!r} is too small for padding={padding!r} "
                "(needs height and width >= 16); use padding='SAME'"
            )
        self.padding = padding
        self.conv1 = nnx.Conv(channels, 20, (5, 5), padding=padding, rngs=rngs)
        self.conv2 = nnx.Conv(20, 50, (5, 5), padding=padding, rngs=rngs)
        self.fc1 = nnx.Linear(math.prod(sizes) * 50, 500, rngs=rngs)
        self.fc2 = nnx.Linear(500, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(batch, num_classes)`` of a batch ``(batch, H, W, C)``."""
        x = _max_pool(nnx.relu(self.conv1(x)), self.padding)
        x = _max_pool(nnx.relu(self.conv2(x)), self.padding)
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


class SmallCNN(nnx.Module):
    """conv32 -> pool -> conv64 -> pool -> fc128 -> fc, with the flatten size derived.

    3x3 ``'SAME'`` convolutions with ReLU and 2x2 max pooling that rounds up,
    so the input size is free (32x32x3 by default, 8x8x1 digits work too).
    Unlike the classic tutorial network, the size of ``fc1`` is computed from
    ``in_shape`` instead of being hard-coded.

    Args:
      in_shape: ``(height, width, channels)`` of one input.
      num_classes: number of outputs.
      rngs: random number generators for the initialisation.

    Example:
      >>> nnx.eval_shape(lambda: SmallCNN(rngs=nnx.Rngs(0))).fc1.in_features
      4096
      >>> nnx.eval_shape(lambda: SmallCNN((8, 8, 1), rngs=nnx.Rngs(0)).fc1).in_features
      256
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (32, 32, 3),
        num_classes: int = 10,
        *,
        rngs: nnx.Rngs,
    ):
        height, width, channels = _check_in_shape(in_shape)
        _check_positive("num_classes", num_classes)
        sizes = [_out_size(_out_size(n, 2, 2, "SAME"), 2, 2, "SAME") for n in (height, width)]
        self.conv1 = nnx.Conv(channels, 32, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), padding="SAME", rngs=rngs)
        self.fc1 = nnx.Linear(math.prod(sizes) * 64, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(batch, num_classes)`` of a batch ``(batch, H, W, C)``."""
        x = _max_pool(nnx.relu(self.conv1(x)), "SAME")
        x = _max_pool(nnx.relu(self.conv2(x)), "SAME")
        x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc2(x)


# He et al. (2015): N(0, 2 / fan), the torchvision ResNet initialisation (fan_out).
_HE_NORMAL = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(
    in_channels: int, out_channels: int, kernel: int, stride: int, rngs: nnx.Rngs
) -> nnx.Conv:
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=False,
        kernel_init=_HE_NORMAL,
        rngs=rngs,
    )


def _batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, rngs=rngs)


class _ShortcutMixin:
    """The projection shortcut shared by both residual blocks."""

    def _init_shortcut(
        self, in_channels: int, out_channels: int, stride: int, rngs: nnx.Rngs
    ) -> None:
        if stride != 1 or in_channels != out_channels:
            self.shortcut_conv = _conv(in_channels, out_channels, 1, stride, rngs)
            self.shortcut_bn = _batch_norm(out_channels, rngs)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    @property
    def has_projection(self) -> bool:
        """True if the shortcut is a 1x1 convolution + batch norm, False if identity."""
        return self.shortcut_conv is not None

    def _shortcut(self, x: jax.Array) -> jax.Array:
        if self.shortcut_conv is None or self.shortcut_bn is None:
            return x
        return self.shortcut_bn(self.shortcut_conv(x))


def _check_block_args(in_channels: int, out_channels: int, stride: int) -> None:
    _check_positive("in_channels", in_channels)
    _check_positive("out_channels", out_channels)
    _check_positive("stride", stride)


class ResidualBlock(_ShortcutMixin, nnx.Module):
    r"""Basic residual block: two 3x3 conv + batch norm, plus a shortcut.

    .. math::
      y = \operatorname{relu}(\operatorname{bn}_2(\operatorname{conv}_2(
          \operatorname{relu}(\operatorname{bn}_1(\operatorname{conv}_1 x)))) + s(x))

    The shortcut :math:`s` is the identity when the shape is kept
    (``stride == 1`` and ``in_channels == out_channels``), otherwise a 1x1
    convolution with ``stride`` followed by batch norm (``shortcut_conv``,
    ``shortcut_bn``; ``None`` for the identity).

    Args:
      in_channels: input channels.
      out_channels: output channels.
      stride: stride of the first convolution (and of the projection).
      rngs: random number generators for the initialisation.

    Example:
      >>> block = ResidualBlock(4, 8, stride=2, rngs=nnx.Rngs(0))
      >>> block.has_projection, block(jnp.zeros((1, 6, 6, 4))).shape
      (True, (1, 3, 3, 8))
      >>> nnx.eval_shape(lambda: ResidualBlock(16, 16, rngs=nnx.Rngs(0))).has_projection
      False

    References:
      He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
      https://arxiv.org/abs/1512.03385, 2016 (projection shortcut, option B).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, rngs: nnx.Rngs):
        _check_block_args(in_channels, out_channels, stride)
        self.conv1 = _conv(in_channels, out_channels, 3, stride, rngs)
        self.bn1 = _batch_norm(out_channels, rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, 1, rngs)
        self.bn2 = _batch_norm(out_channels, rngs)
        self._init_shortcut(in_channels, out_channels, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Output ``(batch, ceil(H / stride), ceil(W / stride), out_channels)``."""
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return nnx.relu(h + self._shortcut(x))


class BottleneckBlock(_ShortcutMixin, nnx.Module):
    """Bottleneck residual block: 1x1 reduce, 3x3, 1x1 expand, each with batch norm.

    The output has ``out_channels`` channels; the inner convolutions have
    ``out_channels // expansion``. The 3x3 convolution carries the stride.
    The shortcut is as in :class:`ResidualBlock`.

    Args:
      in_channels: input channels.
      out_channels: output channels, a multiple of ``expansion``.
      stride: stride of the 3x3 convolution (and of the projection).
      expansion: ratio of output to inner channels.
      rngs: random number generators for the initialisation.

    Raises:
      ValueError: if ``out_channels`` is not a multiple of ``expansion``.

    Example:
      >>> block = nnx.eval_shape(lambda: BottleneckBlock(16, 64, rngs=nnx.Rngs(0)))
      >>> block.conv2.in_features, block.has_projection
      (16, True)
      >>> f = lambda: BottleneckBlock(16, 64, stride=2, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 16)))
      >>> nnx.eval_shape(f).shape
      (1, 4, 4, 64)

    References:
      He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
      https://arxiv.org/abs/1512.03385, 2016 (Fig. 5, right).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        expansion: int = 4,
        rngs: nnx.Rngs,
    ):
        _check_block_args(in_channels, out_channels, stride)
        _check_positive("expansion", expansion)
        if out_channels % expansion:
            raise ValueError(
                f"out_channels must be a multiple of expansion={expansion}; "
                f"got out_channels={out_channels}"
            )
        inner = out_channels // expansion
        self.conv1 = _conv(in_channels, inner, 1, 1, rngs)
        self.bn1 = _batch_norm(inner, rngs)
        self.conv2 = _conv(inner, inner, 3, stride, rngs)
        self.bn2 = _batch_norm(inner, rngs)
        self.conv3 = _conv(inner, out_channels, 1, 1, rngs)
        self.bn3 = _batch_norm(out_channels, rngs)
        self._init_shortcut(in_channels, out_channels, stride, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Output ``(batch, ceil(H / stride), ceil(W / stride), out_channels)``."""
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return nnx.relu(h + self._shortcut(x))


class ResNet(nnx.Module):
    """CIFAR-style ResNet: 3x3 stem, three stages (stride 1, 2, 2), pool, linear.

    With basic blocks (:class:`ResidualBlock`) the depth is ``6n + 2`` and the
    stages have ``width``, ``2 width``, ``4 width`` channels (ResNet-20: n=3,
    width 16, 0.27M parameters). With ``bottleneck=True``
    (:class:`BottleneckBlock`, expansion 4) the depth is ``9n + 2`` and the
    stages output four times as many channels. Blocks live in
    ``stages[i][j]``; a projection shortcut appears where the shape changes.

    Auxiliary heads: with ``aux_heads=True`` each stage but the last feeds a
    classifier (global average pool + linear, ``aux_fcs[i]``).
    ``model(x, return_aux=True)`` returns ``(logits, [aux_logits_0, ...])``;
    the list is empty without heads. Train with
    :func:`jaxopt_nn.train.auxiliary_loss_fn`.

    Args:
      depth: ``6n + 2`` (basic) or ``9n + 2`` (bottleneck), ``n >= 1``.
      num_classes: number of outputs.
      width: channels of the stem and the first stage.
      in_channels: channels of the input images (3 for CIFAR, 1 for digits).
      aux_heads: add auxiliary classifiers after the intermediate stages.
      bottleneck: use bottleneck blocks.
      rngs: random number generators for the initialisation.

    Raises:
      ValueError: if ``depth`` does not have the form above.

    Example:
      Shapes only (``nnx.eval_shape`` allocates nothing):

      >>> model = nnx.eval_shape(lambda: ResNet(20, rngs=nnx.Rngs(0)))
      >>> len(model.stages), len(model.stages[0]), model.stages[1][0].has_projection
      (3, 3, True)
      >>> def forward():
      ...     model = ResNet(8, in_channels=1, aux_heads=True, rngs=nnx.Rngs(0))
      ...     return model(jnp.zeros((2, 8, 8, 1)), return_aux=True)
      >>> logits, aux = nnx.eval_shape(forward)
      >>> logits.shape, [a.shape for a in aux]
      ((2, 10), [(2, 10), (2, 10)])

    References:
      He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
      https://arxiv.org/abs/1512.03385, 2016 (Section 4.2).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        *,
        width: int = 16,
        in_channels: int = 3,
        aux_heads: bool = False,
        bottleneck: bool = False,
        rngs: nnx.Rngs,
    ):
        per_block = 9 if bottleneck else 6
        if (
            isinstance(depth, bool)
            or not isinstance(depth, int)
            or depth < per_block + 2
            or ((depth - 2) % per_block)
        ):
            raise ValueError(
                f"depth must be {per_block}n + 2 with n >= 1 for bottleneck={bottleneck}; "
                f"got depth={depth!r}"
            )
        _check_positive("num_classes", num_classes)
        _check_positive("width", width)
        _check_positive("in_channels", in_channels)
        n = (depth - 2) // per_block
        expansion = 4 if bottleneck else 1
        self.stem_conv = _conv(in_channels, width, 3, 1, rngs)
        self.stem_bn = _batch_norm(width, rngs)
        stages, channels = [], width
        for i in range(3):
            out = width * 2**i * expansion
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                if bottleneck:
                    blocks.append(BottleneckBlock(channels, out, stride=stride, rngs=rngs))
                else:
                    blocks.append(ResidualBlock(channels, out, stride=stride, rngs=rngs))
                channels = out
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.fc = nnx.Linear(channels, num_classes, rngs=rngs)
        if aux_heads:
            self.aux_fcs = nnx.List(
                [nnx.Linear(width * 2**i * expansion, num_classes, rngs=rngs) for i in range(2)]
            )
        else:
            self.aux_fcs = None

    def __call__(
        self, x: jax.Array, *, return_aux: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """Logits ``(batch, num_classes)``, and the auxiliary logits if ``return_aux``."""
        x = nnx.relu(self.stem_bn(self.stem_conv(x)))
        aux = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if self.aux_fcs is not None and i < len(self.aux_fcs):
                aux.append(self.aux_fcs[i](x.mean(axis=(1, 2))))
        logits = self.fc(x.mean(axis=(1, 2)))
        return (logits, aux) if return_aux else logits


def auxiliary_loss(
    main_loss: jax.Array, aux_losses: Sequence[jax.Array], lam: float | jax.Array
) -> jax.Array:
    """Total loss with auxiliary (shortcut) classifier terms.

    .. math::
      L_{total} = L_{main} + \\lambda \\sum_i L_{aux,i}

    Args:
      main_loss: scalar loss of the final classifier.
      aux_losses: scalar losses of the auxiliary heads (may be empty).
      lam: weight :math:`\\lambda \\ge 0` of the auxiliary terms.

    Returns:
      The scalar total loss.

    Raises:
      ValueError: if ``lam`` is a negative Python number.

    Example:
      >>> float(auxiliary_loss(jnp.array(1.0), [jnp.array(0.5), jnp.array(1.5)], 0.25))
      1.5

    References:
      Szegedy et al., "Going deeper with convolutions" (auxiliary classifiers),
      https://arxiv.org/abs/1409.4842, 2015.
    """
    if isinstance(lam, (int, float)) and lam < 0:
        raise ValueError(f"lam must be >= 0; got lam={lam!r}")
    total = sum(aux_losses, jnp.zeros_like(main_loss))
    return main_loss + lam * total
