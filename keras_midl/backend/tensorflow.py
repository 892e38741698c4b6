"""TensorFlow: the native kernel in eager calls, compiled eager calls, and
the training selection compiled with XLA."""

import numpy as np
import tensorflow as tf

from keras_midl import config
from keras_midl.native import kernels

_on_cpu = []
_selections = {}


def in_trace(inputs):
    """Whether TensorFlow is building a graph (`tf.function`, Keras's
    `predict` and `fit`, an export)."""
    return not tf.executing_eagerly()


def exporting():
    """TensorFlow's exporters trace graphs; `in_trace` covers them."""
    return False


def _computes_on_cpu():
    """No GPU visible: the kernel would copy GPU weights to the host."""
    if not _on_cpu:
        _on_cpu.append(not tf.config.list_logical_devices("GPU"))
    return _on_cpu[0]


def native_forward(inputs, weights, k):
    """The whole gathered forward in the native kernel, on the tensors'
    buffers (eager CPU tensors share their memory with NumPy); `None`
    where it cannot run (a GPU, a non-float32 tensor)."""
    if not _computes_on_cpu() or any(
        w is not None and w.dtype != tf.float32 for w in weights.values()
    ):
        return None
    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    inputs = tf.cast(inputs, tf.float32)
    rows = inputs.numpy().reshape(-1, input_dim)
    arrays = {
        name: None if weights[name] is None else np.asarray(weights[name])
        for name in kernels.FORWARD_WEIGHTS
    }
    outputs, _ = kernels.sparse_forward(rows, arrays, k)
    return tf.reshape(outputs, (*inputs.shape[:-1], units))


def compiled_gathered(inputs, weights, k):
    """The eager call goes through the compiled layer call instead."""
    return None


def compile_layer_call(call):
    """`call(trainable, non_trainable, x)` as one `tf.function` (without
    XLA, as Keras's `predict`): run op by op, MIDL's gate costs 10-50x a
    Dense layer. Traced again for a new input shape until the shapes
    differ, then once for any batch size (`reduce_retracing`)."""
    return tf.function(call, reduce_retracing=True)


def compiled_selection(select, scores):
    """`select(scores)` compiled with XLA and run from the caller's graph.

    Keras runs TensorFlow training steps on a CPU as graphs without XLA,
    where the selection is dozens of small kernels (the bisection alone
    runs 31 steps of about ten ops), each costing more to launch than its
    work. Compiled alone with XLA it is a few fused kernels, with the same
    mask bit for bit. One function per selection (`select`'s identity is
    its `(k, method)`, see `keras_midl.ops.dispatch`) and score signature;
    the leading axes stay free.
    """
    if not config.native_kernels_enabled():
        return select(scores)
    scores = tf.convert_to_tensor(scores)
    key = (select.key, len(scores.shape), scores.shape[-1], scores.dtype)
    if key not in _selections:
        signature = tf.TensorSpec(
            [None] * (len(scores.shape) - 1) + [scores.shape[-1]],
            scores.dtype,
        )
        _selections[key] = tf.function(
            select, input_signature=[signature], jit_compile=True
        )
    return tf.stop_gradient(_selections[key](scores))
