"""JAX: the native kernel in eager calls and compiled eager calls."""

import jax
import jax.numpy as jnp
import numpy as np

from keras_midl.backend import generic
from keras_midl.native import kernels

# The same as on a backend without a module of its own.
exporting = generic.exporting
compiled_gathered = generic.compiled_gathered
native_topk_mask = generic.native_topk_mask
native_mix = generic.native_mix
read_value = generic.read_value
compiled_selection = generic.compiled_selection


def in_trace(inputs):
    """Whether JAX is tracing (`jax.jit`, Keras's `predict` and `fit`, an
    export): the inputs are tracers."""
    return isinstance(inputs, jax.core.Tracer)


def native_forward(inputs, weights, k, quantize_inputs=True):
    """The whole gathered forward in the native kernel, on the arrays'
    buffers (CPU arrays share their memory with NumPy); `None` where it
    cannot run (the default backend is not the CPU, an array neither
    float32 nor the int8 kernel of a quantized layer). `quantize_inputs`:
    int8 only, see `keras_midl.native.sparse_forward`."""
    if jax.default_backend() != "cpu" or not generic.native_dtypes(
        weights, lambda w: w.dtype == jnp.float32, lambda w: w.dtype == jnp.int8
    ):
        return None
    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    # NumPy views of the CPU buffers; the outputs are shaped in NumPy and
    # cross into JAX once (each JAX op in an eager call costs 10-30 us).
    rows = np.asarray(inputs, np.float32)
    arrays = {
        name: None if weights[name] is None else np.asarray(weights[name])
        for name in kernels.FORWARD_WEIGHTS
    }
    outputs, _ = kernels.sparse_forward(
        rows.reshape(-1, input_dim), arrays, k, quantize_inputs=quantize_inputs
    )
    return jnp.asarray(outputs.reshape(*rows.shape[:-1], units))


def compile_layer_call(call, static_shapes=False):
    """`call(trainable, non_trainable, x)` under `jax.jit`: run op by op,
    MIDL's gate (a `fori_loop` for the bisection) costs 10-50x a Dense
    layer. Its shapes are always static (one trace per input shape)."""
    return jax.jit(call)

