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
* `native_forward(inputs, weights, k)`: a layer's gathered forward in
  the native kernel, or `None` where it cannot run here (device, dtype).
* `compiled_gathered(inputs, weights, options)`: the gathered forward
  compiled by the backend for an eager call, or `None`.
* `compiled_layer_call(layer, key, inputs)`: the layer's masked
  inference compiled for an eager call, or `None`.
* `training_topk_mask(scores, k, method)`: the training selection.
"""

import keras


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
