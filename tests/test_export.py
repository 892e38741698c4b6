"""Exporting MIDL models for serving: TF SavedModel and ONNX.

`model.export(format="tf_saved_model")` works on the TensorFlow and JAX
backends (Keras has no SavedModel export from torch). ONNX export works on
TensorFlow with the default selection (an export's trace, of an unknown
batch size, selects with `top_k` there: tf2onnx converts no bitcast nor
bitwise op, which the training selection `"bisection"` uses) and on
torch, where the exporter records the masked inference path (the gathered
path's `scatter_update` lowers to `aten::ravel`, which the exporter does
not convert). The reloaded models must give the Keras model's predictions
to `atol=1e-5`.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from backend_utils import BACKEND

from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl import midl_conv2d

ATOL = 1e-5


def _model(input_shape=(12,), gathered=True, **midl_kwargs):
    """Two MIDL layers: the first on the masked path, the second gathered."""
    keras.utils.set_random_seed(3)
    midl_kwargs = {"k_ratio": 0.4, "rank": 4, **midl_kwargs}
    model = keras.Sequential(
        [
            keras.Input(input_shape),
            MIDL(16, activation="relu", **midl_kwargs),
            MIDL(
                8,
                light_path="zero",
                inference_path="gathered" if gathered else "masked",
                **midl_kwargs,
            ),
            keras.layers.Dense(3),
        ]
    )
    model.predict(_inputs((2, *input_shape)), verbose=0)
    return model


def _inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A model on rank-3 inputs, exported once as a TF SavedModel.

    On JAX the gathered path is left out: it uses `ops.top_k`, which JAX
    0.10 lowers to a `stablehlo.composite` that TensorFlow 2.21's
    `XlaCallModule` cannot deserialize.
    """
    if BACKEND not in ("tensorflow", "jax"):
        pytest.skip(
            "Keras exports TF SavedModels from the TensorFlow and JAX "
            "backends only"
        )
    model = _model((5, 12), gathered=BACKEND == "tensorflow")
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    model.export(path, format="tf_saved_model", verbose=False)
    return model, path


_SERVE_WITH_TF_ONLY = """
import sys
import numpy as np
import tensorflow as tf

served = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], served.serve(x).numpy())
assert "keras_midl" not in sys.modules
"""


def test_tf_saved_model_served_by_tensorflow_alone(exported, tmp_path):
    # A fresh process that imports TensorFlow but not keras_midl serves 6
    # rows; the model was traced with 2 (the batch size stays dynamic).
    model, path = exported
    x = _inputs((6, 5, 12))
    np.save(tmp_path / "x.npy", x)
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _SERVE_WITH_TF_ONLY,
            path,
            str(tmp_path / "x.npy"),
            str(tmp_path / "y.npy"),
        ],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), model.predict(x, verbose=0), atol=ATOL
    )


def _onnx_case():
    if BACKEND == "tensorflow":
        pytest.importorskip("tf2onnx")
        return {}  # the default selection exports
    if BACKEND == "torch":
        pytest.importorskip("onnxscript")
        return {}  # the gathered layer exports its masked path
    pytest.skip(
        "ONNX export from the JAX backend needs jax2onnx, not a dependency "
        "of keras_midl; see docs/deployment.md"
    )


def test_onnx_export_serves_same_predictions(tmp_path):
    midl_kwargs = _onnx_case()
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _model(**midl_kwargs)
    path = str(tmp_path / "model.onnx")
    model.export(path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(path)
    (input_spec,) = session.get_inputs()
    x = _inputs((6, 12))
    (served,) = session.run(None, {input_spec.name: x})
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=ATOL)


# --- MIDLConv2D --------------------------------------------------------------


def _conv_model(inference_path, batch_size=None):
    """Two MIDLConv2D layers (light path low-rank, then zero) on 6x6x3."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 3), batch_size=batch_size),
            MIDLConv2D(
                8,
                3,
                k_ratio=0.5,
                padding="same",
                activation="relu",
                bias_initializer="random_normal",
                inference_path=inference_path,
            ),
            MIDLConv2D(
                6,
                3,
                k_ratio=0.5,
                strides=2,
                light_path="zero",
                inference_path=inference_path,
            ),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.predict(_inputs((batch_size or 2, 6, 6, 3)), verbose=0)
    return model


@pytest.mark.parametrize(
    "inference_path, batch_size", [("masked", None), ("gathered", 1)]
)
def test_conv_tf_saved_model_reloads(
    inference_path, batch_size, tmp_path, monkeypatch
):
    """On TensorFlow the gathered path is exported for a model of static
    batch size 1 (`keras.Input(batch_size=1)`); the masked one for any
    batch size. Keras's JAX export makes the batch size symbolic
    (shape-polymorphic) even then, so the layer exports its masked path
    there."""
    if BACKEND not in ("tensorflow", "jax"):
        pytest.skip(
            "Keras exports TF SavedModels from the TensorFlow and JAX "
            "backends only"
        )
    tf = pytest.importorskip("tensorflow")
    model = _conv_model(inference_path, batch_size)
    traced = []
    original = midl_conv2d.gathered_conv

    def spy(*args, **kwargs):
        traced.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(midl_conv2d, "gathered_conv", spy)
    path = str(tmp_path / "saved_model")
    model.export(path, format="tf_saved_model", verbose=False)
    gathers = inference_path == "gathered" and BACKEND == "tensorflow"
    assert bool(traced) == gathers
    served = tf.saved_model.load(path)
    x = _inputs((batch_size or 5, 6, 6, 3), seed=1)
    np.testing.assert_allclose(
        served.serve(x).numpy(), model.predict(x, verbose=0), atol=ATOL
    )


def test_conv_onnx_export_serves_same_predictions(tmp_path):
    _onnx_case()
    pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _conv_model("masked")
    path = str(tmp_path / "conv.onnx")
    model.export(path, format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(path)
    (input_spec,) = session.get_inputs()
    x = _inputs((4, 6, 6, 3), seed=2)
    (served,) = session.run(None, {input_spec.name: x})
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=ATOL)
