"""Backend-specific test helpers (the library itself uses keras.ops only)."""

import keras
import numpy as np


def value_and_gradients(fn, *arrays):
    """Returns `fn(*arrays)` and its gradients w.r.t. each array, in NumPy.

    `fn` maps backend tensors to a scalar tensor.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.Variable(a) for a in arrays]
        with tf.GradientTape() as tape:
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
        return value.numpy(), [g.numpy() for g in grads]
    if backend == "jax":
        import jax

        value, grads = jax.value_and_grad(
            fn, argnums=tuple(range(len(arrays)))
        )(*arrays)
        return np.asarray(value), [np.asarray(g) for g in grads]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors)
        return value.detach().numpy(), [g.numpy() for g in grads]
    raise NotImplementedError(backend)


def variable_gradients(layer, fn):
    """Gradients of `fn()` w.r.t. the layer's trainable variables, in NumPy.

    Returns a dict keyed by the variable's path-less name.
    """
    backend = keras.backend.backend()
    variables = layer.trainable_variables
    names = [v.name for v in variables]
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = fn()
        grads = tape.gradient(value, [v.value for v in variables])
        return dict(zip(names, [np.asarray(g) for g in grads]))
    if backend == "jax":
        import jax

        values = [v.value for v in variables]

        def stateless(values):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values))
            ):
                return fn()

        grads = jax.grad(stateless)(values)
        return dict(zip(names, [np.asarray(g) for g in grads]))
    if backend == "torch":
        import torch

        value = fn()
        grads = torch.autograd.grad(value, [v.value for v in variables])
        return dict(zip(names, [g.numpy() for g in grads]))
    raise NotImplementedError(backend)
