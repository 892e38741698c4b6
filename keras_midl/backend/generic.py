"""The backend functions for a backend without a module of its own (such
as NumPy's): no native kernel and nothing compiled; `keras.ops` only.
The backend modules take from here the functions where they do the same
(nothing to export specially, nothing compiled, values read as they
are)."""

import numpy as np


def in_trace(inputs):
    """Whether the call is traced; never on this backend."""
    return False


def exporting():
    """Whether a tracing exporter that freezes branches records the call;
    never here (the exporters of TensorFlow and JAX trace as `in_trace`
    sees)."""
    return False


def native_forward(inputs, weights, k):
    """The native kernel does not run on this backend."""
    return None


def compiled_gathered(inputs, weights, k):
    """No compiled gathered path: the `keras.ops` one runs."""
    return None


def read_value(value):
    """The value as it is."""
    return value


def compile_layer_call(call, static_shapes=False):
    """Eager calls are not compiled."""
    return None


def compiled_selection(select, scores):
    """The training selection as it is (not compiled separately)."""
    return select(scores)


def native_topk_mask(scores, k, training):
    """No native selection: `None`, the caller runs `topk_mask`."""
    return None


def native_mix(mask, logits, full, light, temperature):
    """No native mix: `None`, the caller runs `straight_through_mix`."""
    return None


def native_dtypes(weights, is_float32, is_int8):
    """Whether the native kernel takes these weights: all float32, or an
    int8 `kernel` with its `kernel_scale` and the rest float32."""
    int8 = weights.get("kernel_scale") is not None
    for name, weight in weights.items():
        if weight is None:
            continue
        if name == "kernel" and int8:
            if not is_int8(weight):
                return False
        elif not is_float32(weight):
            return False
    return True


def native_arrays(arrays):
    """`native_dtypes` of NumPy arrays (views of a layer's weights)."""
    return native_dtypes(
        arrays,
        lambda array: array.dtype == np.float32,
        lambda array: array.dtype == np.int8,
    )
