"""The training-time selection, compiled with XLA on TensorFlow.

Keras runs TensorFlow training steps on a CPU as `tf.function` graphs
without XLA. There `topk_mask` is dozens of small kernels (the bisection
loop alone runs 31 steps of about ten ops), and each kernel launch costs
more than its work at the layer sizes of an MLP. Compiling the selection
alone with XLA (`tf.function(jit_compile=True)`, called from the
surrounding graph) fuses it into a few kernels; the mask is the same,
bit for bit (`tests/test_compiled_selection.py`).

The other backends compile the whole step already (JAX) or gain nothing
from it (torch's eager kernels are few and large), so `topk_mask` runs
there as it is. `KERAS_MIDL_COMPILE=0` turns the compilation off, as it
does for the torch fast inference path (`keras_midl.fast_inference`).
"""

import keras
from keras import ops

from keras_midl import fast_inference
from keras_midl.selection import topk_mask

_functions = {}


def training_topk_mask(scores, k, method):
    """`topk_mask(scores, k, method, check_ties_first=True)`, XLA-compiled
    on TensorFlow (see the module docstring), with no gradient.

    Args:
        scores: Float tensor of shape `(..., n)`.
        k: Python int, `1 <= k <= n`.
        method: `"top_k"` or `"bisection"`.

    Returns:
        Float32 tensor of the shape of `scores` holding 0s and 1s.
    """
    if (
        keras.backend.backend() != "tensorflow"
        or not fast_inference.compile_enabled()
    ):
        return topk_mask(scores, k, method=method, check_ties_first=True)
    import tensorflow as tf

    # One function per selection and score signature; the leading axes
    # stay free (XLA compiles each concrete shape once, tracing happens
    # once per key).
    scores = ops.convert_to_tensor(scores)
    key = (k, method, len(scores.shape), scores.shape[-1], scores.dtype)
    if key not in _functions:
        signature = tf.TensorSpec(
            [None] * (len(scores.shape) - 1) + [scores.shape[-1]],
            scores.dtype,
        )
        _functions[key] = tf.function(
            lambda s: topk_mask(s, k, method=method, check_ties_first=True),
            input_signature=[signature],
            jit_compile=True,
        )
    return ops.stop_gradient(_functions[key](scores))
