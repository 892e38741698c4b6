"""What only one backend can do, one module per backend.

`keras_midl.ops.dispatch` asks `current()` for the module of the backend
in use; code outside these modules uses `keras.ops` only. Every module
offers the same functions (see `keras_midl.backend.generic`, the one used
on backends without a module of their own, such as NumPy's):

* `in_trace(inputs)`: whether the call is being traced or compiled
  (a graph, `jax.jit`, `torch.compile`, `torch.jit.trace`), where the
  native kernel never runs.
* `exporting()`: whether a tracing exporter records the call
  (`torch.jit.trace`, used by the ONNX exporter), which freezes
  data-dependent branches and records no custom gradient.
* `matmul_transposed(inputs, kernel)`: `inputs @ kernel^T` for a kernel
  stored as `(units, input_dim)` (MIDL's full path), in the form that is
  fastest on the backend.
* `conv_kernel(kernel)`: a convolution kernel `(*spatial, c_in, c_out)`
  as `ops.conv` takes it, in the layout the backend's convolution needs
  (torch: a copy of a half-precision kernel whose `c_out` is 1, see
  there).
* `native_forward(inputs, weights, k)`: a layer's gathered forward in
  the native kernel, or `None` where it cannot run here (device, dtype).
* `compiled_gathered(inputs, weights, k)`: the gathered forward compiled
  by the backend (torch: `torch.compile`), or `None` for `keras.ops`.
* `compile_layer_call(call)`: `call(trainable, non_trainable, x)`, a
  layer's inference, compiled for eager calls (`tf.function`,
  `jax.jit`), or `None` where eager calls are not compiled.
* `read_value(value)`: a variable's value as a tensor, for the ops that
  must not take the variable itself.
* `compiled_selection(select, scores)`: the selection `select(scores)`
  (training, and the masked path's at larger batches), compiled where
  that pays (XLA on TensorFlow), in blocks of rows that stay in a CPU
  core's cache where XLA compiles it (TensorFlow, JAX).
* `native_topk_mask(scores, k, training)`: `topk_mask(scores, k)` in the
  native kernel (torch eager; TensorFlow eager, and its training graphs
  without XLA; JAX's training steps, an XLA FFI call), or `None` where
  it does not run.
* `native_mix(mask, logits, full, light, temperature,
  return_frequencies=False, training=False, bias=None, light_bias=None)`:
  `straight_through_mix` of `full + bias` and `light + light_bias` with a
  native forward and backward (torch eager and compiled; TensorFlow's
  training graphs without XLA), or `None`.
* `native_select_mix_runs(inputs)` and `native_select_mix(logits, k,
  full, bias, light, light_bias)`: the masked path's inference output,
  selection and mix in one native pass with no mask (torch eager, no
  gradient recorded); `False` and `None` elsewhere.
"""

import keras

# A MIDL layer's weights as the inference paths take them, in order.
WEIGHT_NAMES = (
    "kernel",
    "bias",
    "projection",
    "gate_kernel",
    "gate_bias",
    "light_kernel",
    "light_bias",
    "kernel_scale",
)


def current():
    """The module of the backend in use."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_midl.backend import tensorflow as module
    elif name == "jax":
        from keras_midl.backend import jax as module
    elif name == "torch":
        from keras_midl.backend import torch as module
    else:
        from keras_midl.backend import generic as module
    return module
