"""TensorFlow: the native kernel in eager calls, compiled eager calls, and
the training selection and straight-through mix in C (TensorFlow ops,
`keras_midl/native/tf_ops.cc`, in training graphs without XLA) or the
selection compiled with XLA."""

import os

import numpy as np
import tensorflow as tf

from keras_midl import config
from keras_midl.backend import generic
from keras_midl.native import build
from keras_midl.native import kernels
from keras_midl.ops.selection import cache_sized_block

_on_cpu = []
_selections = {}
_EMPTY = (0,)


# The same as on a backend without a module of its own.
exporting = generic.exporting
conv_kernel = generic.conv_kernel
compiled_gathered = generic.compiled_gathered
native_select_mix_runs = generic.native_select_mix_runs
native_select_mix = generic.native_select_mix


def in_trace(inputs):
    """Whether TensorFlow is building a graph (`tf.function`, Keras's
    `predict` and `fit`, an export)."""
    return not tf.executing_eagerly()


def matmul_transposed(inputs, kernel):
    """`inputs @ kernel^T` for a kernel stored as `(units, input_dim)`.

    One `BatchMatMulV2` reading the kernel transposed (`adj_y`, what
    `tf.einsum("bi,oi->bo")` lowers to), in graphs and eager calls, for
    every row count but a static single row. Its gradients are two
    matmuls, the kernel's written in the kernel's layout (no `Transpose`
    of the kernel or of its gradient). On the AMD EPYC (Zen 4) this
    project's later results come from, one thread, forward in a
    `tf.function`, time over `x @ W` in Dense's layout: 0.97x at 256 x
    4096 -> 4096 and 0.84-1.05x from 4 to 1024 rows, where `MatMul` with
    `transpose_b` (this function's form before, at 128 rows and more)
    took 1.00-1.09x from 127 rows and 1.50-1.62x at 16, and `(kernel @
    rows^T)^T` (its form below 128 rows and in eager calls) up to 1.50x
    (1.57x eager); forward and backward 0.95-1.04x against `transpose_b`'s
    1.03-1.08x (1.15x at 16 rows). At one row `BatchMatMulV2` took 1.44x
    and `(kernel @ rows^T)^T` 0.92x, so a single row keeps
    `generic.matmul_transposed`'s form. One-off A/Bs, interleaved
    medians; on the Intel Xeon of the earlier results `MatMul` with
    `transpose_b` and `einsum` measured alike at 256 rows, and
    `BatchMatMulV2` was not measured there.
    """
    return generic.matmul_rows(inputs, kernel, _matmul_transposed_rows)


def _matmul_transposed_rows(rows, kernel):
    """`rows @ kernel^T` of a matrix `rows`, by `matmul_transposed`'s
    rule."""
    if rows.shape[0] == 1:
        return generic.transposed_activations(rows, kernel)
    return tf.raw_ops.BatchMatMulV2(
        x=rows, y=tf.convert_to_tensor(kernel), adj_y=True
    )


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
    about 0.45 ms. The kernel runs on TensorFlow's intra-op thread count
    (`intra_op_threads`).
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
        np.asarray(inputs),
        arrays,
        k,
        quantize_inputs=quantize_inputs,
        threads=intra_op_threads(),
    )
    return None if outputs is None else tf.constant(outputs)


def intra_op_threads():
    """The threads TensorFlow's ops run on, which the native kernel takes
    too: `tf.config.threading.set_intra_op_parallelism_threads`, else
    `$TF_NUM_INTRAOP_THREADS`, else (TensorFlow's default) every CPU this
    process may run on; never more CPUs than that."""
    cpus = kernels.available_cpus()
    configured = tf.config.threading.get_intra_op_parallelism_threads()
    if configured <= 0:
        try:
            configured = int(os.environ.get("TF_NUM_INTRAOP_THREADS", "0"))
        except ValueError:
            configured = 0
    return min(configured, cpus) if configured > 0 else cpus


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


def _training_ops():
    """The module of MIDL's TensorFlow ops (`keras_midl/native/tf_ops.cc`),
    built on first call against the installed TensorFlow; `None` where
    native kernels are off or it could not be built (one warning)."""
    return build.tf_ops_library(
        [*tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()],
        tf.__version__,
        tf.load_op_library,
    )


def _in_training_graph(training):
    """A graph built for training, not compiled by XLA: where the ops run
    (an XLA cluster has no kernel for them, and a graph built outside
    training may be exported, which must not hold them)."""
    return (
        training
        and not tf.executing_eagerly()
        and tf.__internal__.get_enclosing_xla_context() is None
    )


def native_topk_mask(scores, k, training):
    """`keras_midl.ops.topk_mask(scores, k)` in the native kernel (the
    same mask, bit for bit), with no gradient; `None` where it does not
    run: a GPU, scores not float32, inside XLA (`jit_compile=True`), or
    a graph built outside training (a `predict` or an export, which must
    hold neither a Python call nor a custom op).

    Eager, the kernel runs on the scores' buffer. In a training graph
    (Keras's `fit` and `train_on_batch` on a CPU run graphs without XLA)
    it is the op `MidlTopkMask` (`keras_midl/native/tf_ops.cc`): one op
    in place of the selection's dozens (31 bisection steps), which cost
    more to launch than their work even as a separately XLA-compiled
    function. Where the ops could not be built (no C++ compiler), it is
    the C kernel in a `tf.numpy_function`, a Python call per step."""
    if (
        scores.dtype != tf.float32
        or not _computes_on_cpu()
        or build.library() is None
    ):
        return None
    if tf.executing_eagerly():
        return tf.convert_to_tensor(
            kernels.topk_mask(np.asarray(scores), k, intra_op_threads())
        )
    if not _in_training_graph(training):
        return None
    training_ops = _training_ops()
    if training_ops is not None:
        return training_ops.midl_topk_mask(tf.stop_gradient(scores), k=k)
    mask = tf.numpy_function(
        lambda values: kernels.topk_mask(values, k, intra_op_threads()),
        [tf.stop_gradient(scores)],
        tf.float32,
        stateful=False,
        name="midl_topk_mask",
    )
    mask.set_shape(scores.shape)
    return mask


def native_mix(
    mask,
    logits,
    full,
    light,
    temperature,
    return_frequencies=False,
    training=False,
    bias=None,
    light_bias=None,
):
    """`keras_midl.ops.straight_through_mix` of `full + bias` and `light
    + light_bias` as the ops `MidlMix` and `MidlMixGrad`
    (`keras_midl/native/tf_ops.cc`) in a custom gradient, in a training
    graph without XLA (see `native_topk_mask`); `None` elsewhere, or where
    a tensor is not float32 on a CPU, `mask` is not of `full`'s shape or
    a bias not a vector of its last axis.

    The value is `where(mask, full + bias, light + light_bias)`; the
    gradients `d_full = mask * g`, `d_light = (1 - mask) * g`, `d_logits
    = (g * ((full + bias) - (light + light_bias)) + d_f / rows) * a * (1
    - a) / temperature`, `a = sigmoid(logits / temperature)`, `d_f` the
    gradient of the selection frequencies where they are returned
    (`return_frequencies`), and the biases' the sums of `d_full` and
    `d_light` over the rows. One kernel each way, where the graph of the
    `keras.ops` gradient runs a dozen elementwise kernels, the
    frequencies' gradient and the biases' adds and sums included."""
    tensors = [mask, logits, full] + ([] if light is None else [light])
    if (
        not _in_training_graph(training)
        or any(tensor.dtype != tf.float32 for tensor in tensors)
        or mask.shape != full.shape
        or logits.shape != full.shape
        or full.shape.rank in (None, 0)
        or not _computes_on_cpu()
    ):
        return None
    units = full.shape[-1]
    has_light = light is not None
    biases = [
        None if b is None else tf.convert_to_tensor(b)
        for b in (bias, light_bias if has_light else None)
    ]
    if any(
        b is not None and (b.dtype != tf.float32 or b.shape != (units,))
        for b in biases
    ):
        return None
    training_ops = _training_ops()
    if training_ops is None:
        return None
    mask = tf.stop_gradient(mask)
    temperature = float(temperature)
    # The differentiable inputs present, in order: logits, full, then
    # light, bias and light_bias where given.
    present = [has_light, *(b is not None for b in biases)]
    optional = [t for t in (light, *biases) if t is not None]

    @tf.custom_gradient
    def mix(logits, full, *given):
        light, bias, light_bias = _fill_absent(given, present)
        outputs = training_ops.midl_mix(mask, full, light, bias, light_bias)

        def grad(d_outputs, d_frequencies=None):
            column = tf.zeros(_EMPTY)
            if d_frequencies is not None:
                rows = tf.size(mask) // units
                column = d_frequencies / tf.cast(rows, tf.float32)
            scaled = logits if temperature == 1.0 else logits / temperature
            d_full, d_light, d_logits, d_bias, d_light_bias = (
                training_ops.midl_mix_grad(
                    d_outputs,
                    mask,
                    tf.sigmoid(scaled),
                    full,
                    light,
                    bias,
                    light_bias,
                    column,
                    temperature=temperature,
                )
            )
            d_given = [d_light, d_bias, d_light_bias]
            return (d_logits, d_full) + tuple(
                d for d, given in zip(d_given, present) if given
            )

        if not return_frequencies:
            return outputs, grad
        frequencies = tf.reduce_mean(tf.reshape(mask, (-1, units)), axis=0)
        return (outputs, frequencies), grad

    return mix(logits, full, *optional)


def _fill_absent(given, present):
    """The optional inputs of the mix ops in order, an empty tensor (none)
    for each absent one: `given` holds the present ones."""
    given = iter(given)
    return [next(given) if here else tf.zeros(_EMPTY) for here in present]


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
