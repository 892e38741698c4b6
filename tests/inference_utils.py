"""Helpers of the inference-path tests (test_dispatch.py, test_gathered.py
and the backend modules' tests): layer pairs, a spy on the native kernel,
serving a SavedModel in a fresh process."""

import os
import subprocess
import sys

import keras
import numpy as np

from keras_midl import native
from keras_midl.midl import MIDL
from keras_midl.native import kernels

INPUT_DIM, UNITS = 16, 24

# Layer configurations shared by the tests (few shapes: on torch each
# distinct shape of the gathered path costs one `torch.compile`).
CONFIGS = {
    "k_half": {"k_ratio": 0.5},
    "k_half_noise": {"k_ratio": 0.5, "gate_noise": 0.7, "seed": 3},
    "k_one": {"k_ratio": 0.01, "light_path": "zero", "use_bias": False},
    "k_all": {"k_ratio": 1.0, "activation": "relu"},
}

# The native kernel's entry points, as the backend modules call them.
NATIVE_ENTRY_POINTS = (
    "select_gather_pointers",
    "select_gather",
    "sparse_forward_pointers",
    "sparse_forward",
)


def as_numpy(tensor):
    return keras.ops.convert_to_numpy(tensor)


def make_pair(input_shape, units=UNITS, **kwargs):
    """A masked and a gathered MIDL layer with the same (random) weights."""
    kwargs.setdefault("bias_initializer", "random_normal")
    kwargs.setdefault("selection", "top_k")
    masked = MIDL(units, inference_path="masked", **kwargs)
    gathered = MIDL(units, inference_path="gathered", **kwargs)
    masked.build(input_shape)
    gathered.build(input_shape)
    gathered.set_weights(masked.get_weights())
    return masked, gathered


def spy_native_calls(monkeypatch):
    """Records each call of the native kernel's entry points (by name);
    `None` where the native library is not built here."""
    if not native.available():
        return None
    calls = []
    for name in NATIVE_ENTRY_POINTS:
        original = getattr(kernels, name)

        def spy(*args, original=original, name=name, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return calls


NATIVE_FORWARD = ("sparse_forward_pointers", "select_gather_pointers")
NATIVE_SELECTION = ("topk_mask_pointers", "select_mix_pointers")


def spy_native_threads(monkeypatch, names=NATIVE_FORWARD):
    """The `threads` handed to each call of the native kernels `names`
    (default: the native forward, `kernels.sparse_forward_pointers` and
    `kernels.select_gather_pointers`; `NATIVE_SELECTION`: the selection
    and the masked path's mix), in order."""
    seen = []
    for name in names:
        original = getattr(kernels, name)

        def spy(*args, original=original, **kwargs):
            seen.append(kwargs.get("threads"))
            return original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    return seen


_SERVE = """
import sys
import numpy as np
import tensorflow as tf

served = tf.saved_model.load(sys.argv[1])
np.save(sys.argv[3], served.serve(np.load(sys.argv[2])).numpy())
"""


def served_outputs(model, x, folder):
    """`model` exported as a TF SavedModel into `folder`, and its outputs
    on `x` served by a fresh process that imports TensorFlow only."""
    export_path = os.path.join(folder, "saved_model")
    model.export(export_path, format="tf_saved_model", verbose=False)
    inputs, outputs = (os.path.join(folder, n) for n in ("x.npy", "y.npy"))
    np.save(inputs, x)
    subprocess.run(
        [sys.executable, "-c", _SERVE, export_path, inputs, outputs],
        check=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    return np.load(outputs)
