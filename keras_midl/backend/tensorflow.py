"""TensorFlow: the native kernel in eager calls, compiled eager calls, and
the training selection in C (a `tf.numpy_function` in training graphs
without XLA) or compiled with XLA."""

import numpy as np
import tensorflow as tf

from keras_midl import config
from keras_midl.backend import generic
from keras_midl.native import build
from keras_midl.native import kernels
from keras_midl.ops.selection import cache_sized_block

_on_cpu = []
_selections = {}


# The same as on a backend without a module of its own.
exporting = generic.exporting
compiled_gathered = generic.compiled_gathered
native_mix = generic.native_mix
native_select_mix_runs = generic.native_select_mix_runs
native_select_mix = generic.native_select_mix


def in_trace(inputs):
    """Whether TensorFlow is building a graph (`tf.function`, Keras's
    `predict` and `fit`, an export)."""
    return not tf.executing_eagerly()


def _computes_on_cpu():
    """No GPU visible: the kernel would copy GPU weights to the host."""
    if not _on_cpu:
        _on_cpu.append(not tf.config.list_logical_devices("GPU"))
    return _on_cpu[0]


def native_forward(inputs, weights, k, quantize_inputs=True):
    """The whole gathered forward in the native kernel; `None` where it
    cannot run (a GPU, a tensor neither float32 nor the int8 kernel of a
    quantized layer). `quantize_inputs`: int8 only, see
    `keras_midl.native.sparse_forward`.

    Called in eager code only. Each weight is read as a tensor first
    (`_current_value`), and `np.asarray` of that tensor is a view of its
    buffer: no copy (`np.asarray` of the variable itself, and
    `tensor.numpy()`, copy: 1.7-2.4 ms for a 4096 x 4096 int8 kernel
    here). The shapes are the built layer's, so the kernel runs without
    `sparse_forward`'s checks. Before, the call ran a private
    `tf.function` around a `tf.numpy_function`, whose dispatch alone took
    about 0.45 ms.
    """
    if not _computes_on_cpu():
        return None
    # The tensors stay referenced here until the C call returns.
    tensors = {
        name: None if weights[name] is None else _current_value(weights[name])
        for name in kernels.FORWARD_WEIGHTS
    }
    arrays = {
        name: None if tensor is None else np.asarray(tensor)
        for name, tensor in tensors.items()
    }
    if inputs.dtype != tf.float32:
        inputs = tf.cast(inputs, tf.float32)
    outputs = generic.forward_on_arrays(
        np.asarray(inputs), arrays, k, quantize_inputs=quantize_inputs
    )
    return None if outputs is None else tf.constant(outputs)


def _current_value(value):
    """A variable's current value as a tensor (a tensor as it is), for
    the native kernel, which records no gradient.

    `tf.raw_ops.ReadVariableOp` on the variable's handle: 8 us here,
    where `tf.convert_to_tensor` of the variable takes 20 us (a layer's
    call reads eight); unlike it, a `tf.GradientTape` does not see the
    read (`read_value` is for the ops that need it to). A variable
    without a readable handle (a distributed one outside its replica
    context) is converted."""
    if isinstance(value, tf.Variable):
        try:
            handle = value.handle
        except ValueError:
            return tf.convert_to_tensor(value)
        return tf.raw_ops.ReadVariableOp(resource=handle, dtype=value.dtype)
    return tf.convert_to_tensor(value)


def native_topk_mask(scores, k, training):
    """`keras_midl.ops.topk_mask(scores, k)` in the native kernel (the
    same mask, bit for bit), with no gradient; `None` where it does not
    run: a GPU, scores not float32, inside XLA (`jit_compile=True`), or
    a graph built outside training (a `predict` or an export, which must
    not hold a Python call).

    In a training graph (Keras's `fit` and `train_on_batch` on a CPU run
    graphs without XLA) the kernel runs as a `tf.numpy_function`: one op
    in place of the selection's dozens (31 bisection steps), which cost
    more to launch than their work even as a separately XLA-compiled
    function."""
    if (
        scores.dtype != tf.float32
        or not _computes_on_cpu()
        or build.library() is None
    ):
        return None
    if tf.executing_eagerly():
        return tf.convert_to_tensor(kernels.topk_mask(np.asarray(scores), k))
    if not training or tf.__internal__.get_enclosing_xla_context() is not None:
        return None
    mask = tf.numpy_function(
        lambda values: kernels.topk_mask(values, k),
        [tf.stop_gradient(scores)],
        tf.float32,
        stateful=False,
        name="midl_topk_mask",
    )
    mask.set_shape(scores.shape)
    return mask


def read_value(value):
    """A variable's value as a tensor (a tensor as it is): gathering from
    a variable (`ResourceGather`) would switch it to copy-on-read."""
    return tf.convert_to_tensor(value)


def compile_layer_call(call, static_shapes=False):
    """`call(trainable, non_trainable, x)` as one `tf.function` (without
    XLA, as Keras's `predict`): run op by op, MIDL's gate costs 10-50x a
    Dense layer. Traced again for a new input shape until the shapes
    differ, then once for any batch size (`reduce_retracing`); with
    `static_shapes`, once per input shape (a layer whose path depends on
    the static batch size, as `MIDLConv2D`'s gathered path)."""
    return tf.function(call, reduce_retracing=not static_shapes)


def compiled_selection(select, scores):
    """`select(scores)` compiled with XLA and run from the caller's graph.

    Keras runs TensorFlow training steps on a CPU as graphs without XLA,
    where the selection is dozens of small kernels (the bisection alone
    runs 31 steps of about ten ops), each costing more to launch than its
    work. Compiled alone with XLA it is a few fused kernels, with the same
    mask bit for bit. One function per selection (`select`'s identity is
    its `(k, method)`, see `keras_midl.ops.dispatch`) and score signature;
    the leading axes stay free. Compiled, the selection runs in blocks of
    rows that stay in a core's cache (`keras_midl.ops.selection.
    cache_sized_block`): 1.3-1.4x faster here.
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
        rows_per_block = cache_sized_block(scores.shape[-1])
        _selections[key] = tf.function(
            lambda values: select(values, rows_per_block=rows_per_block),
            input_signature=[signature],
            jit_compile=True,
        )
    return tf.stop_gradient(_selections[key](scores))
