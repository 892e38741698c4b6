"""TensorFlow: the native kernel in eager calls, compiled eager calls, and
the training selection compiled with XLA."""

import tensorflow as tf

from keras_midl import config
from keras_midl.backend import generic
from keras_midl.native import kernels

_on_cpu = []
_selections = {}
_native_functions = {}


# The same as on a backend without a module of its own.
exporting = generic.exporting
compiled_gathered = generic.compiled_gathered


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

    Reading a variable into NumPy eagerly copies it (13 ms for 4096 x
    4096 here); inside a graph, `tf.numpy_function` sees the buffers in
    place. So the eager call runs one private `tf.function` (no
    AutoGraph), whose only work is that `tf.numpy_function`: it is
    keras_midl's own, called from eager code, never exported.
    """
    if not _computes_on_cpu() or not generic.native_dtypes(
        weights, lambda w: w.dtype == tf.float32, lambda w: w.dtype == tf.int8
    ):
        return None
    names = tuple(n for n in kernels.FORWARD_WEIGHTS if weights[n] is not None)
    quantize_inputs = bool(quantize_inputs)
    key = (k, names, quantize_inputs)
    if key not in _native_functions:
        _native_functions[key] = tf.function(
            _native_graph(k, names, quantize_inputs),
            reduce_retracing=True,
            autograph=False,
        )
    return _native_functions[key](inputs, *[weights[n] for n in names])


def _native_graph(k, names, quantize_inputs):
    def forward(inputs, *weights):
        units, input_dim = weights[names.index("kernel")].shape
        rows = tf.reshape(tf.cast(inputs, tf.float32), (-1, input_dim))

        def run(rows, *arrays):
            return kernels.sparse_forward(
                rows, dict(zip(names, arrays)), k,
                quantize_inputs=quantize_inputs,
            )[0]

        outputs = tf.numpy_function(
            run, [rows, *weights], tf.float32, stateful=False
        )
        outputs = tf.ensure_shape(outputs, (None, units))
        shape = tf.concat([tf.shape(inputs)[:-1], [units]], 0)
        return tf.reshape(outputs, shape)

    return forward


def read_value(value):
    """A variable's value as a tensor (a tensor as it is): gathering from
    a variable (`ResourceGather`) would switch it to copy-on-read."""
    return tf.convert_to_tensor(value)


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
