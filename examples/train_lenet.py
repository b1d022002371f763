"""Train LeNet-300-100 on the built-in digits, then a ResNet with auxiliary heads.

1. ``fit`` with ``optax.adam``: one call, a progress bar, a history per epoch.
2. The same with your own loop: ``init_train_state`` + ``make_train_step``
   (jitted, buffers donated) + ``evaluate``, here for a small ResNet whose
   auxiliary heads add ``lam * sum(L_aux)`` to the loss.

Run: ``python examples/train_lenet.py`` (about a minute on a laptop CPU).
"""

import optax
from flax import nnx

from jaxopt_nn.data import batches, load_digits
from jaxopt_nn.models import LeNet300100, ResNet
from jaxopt_nn.train import (
    auxiliary_loss_fn,
    evaluate,
    fit,
    init_train_state,
    make_train_step,
    to_model,
)

data = load_digits()

# 1. One call.
result = fit(LeNet300100(64, rngs=nnx.Rngs(0)), optax.adam(1e-3), data, epochs=20)
print(f"LeNet-300-100: test accuracy {result.history[-1]['test_accuracy']:.2%}")
model = to_model(result.graphdef, result.state)  # an nnx.Module in eval mode
print("predictions:", model(data.x_test[:8]).argmax(-1), "labels:", data.y_test[:8])

# 2. Your own loop, with auxiliary classifier heads.
tx = optax.adam(3e-3)
resnet = ResNet(8, data.num_classes, width=8, in_channels=1, aux_heads=True, rngs=nnx.Rngs(0))
graphdef, state = init_train_state(resnet, tx)
step = make_train_step(graphdef, tx, loss_fn=auxiliary_loss_fn(lam=0.3))
for epoch in range(5):
    for x, y in batches(data.x_train, data.y_train, 128, seed=(0, epoch), drop_remainder=True):
        state, metrics = step(state, x, y)
    test = evaluate(graphdef, state, data.x_test, data.y_test)
    loss = float(metrics["loss"])
    print(f"ResNet-8 epoch {epoch + 1}: loss {loss:.3f}, test accuracy {test['accuracy']:.2%}")
