"""benchmarks/latency_int8.py: the models, the calls and the rows."""

import numpy as np
from backend_utils import BACKEND

from benchmarks import latency_int8


def test_rows_cover_every_model_and_call():
    models = latency_int8.build_models(64)
    eager_models = latency_int8.eager_copies(models)
    rows = latency_int8.measure(64, 2, models, 1, 1, eager_models)
    calls = [row["call"] for row in rows]
    if BACKEND == "torch":  # `predict_on_batch` is eager already
        assert calls == ["model(x)", "predict_on_batch"]
    else:
        assert calls == list(latency_int8.CALLS)
    for row in rows:
        for model in latency_int8.MODELS:
            assert row[f"{model} ms"] > 0
        assert row["traced path (int8 MIDL)"].startswith("keras.ops")


def test_eager_copies_predict_as_the_models():
    models = latency_int8.build_models(32)
    eager_models = latency_int8.eager_copies(models)
    x = np.random.default_rng(0).normal(size=(2, 32)).astype("float32")
    for name, copy in eager_models.items():
        assert copy.run_eagerly
        np.testing.assert_allclose(
            copy.predict_on_batch(x),
            models[name].predict_on_batch(x),
            rtol=1e-5,
            atol=1e-5,
        )
    if BACKEND != "torch":
        assert set(eager_models) == set(models)
        assert any(
            layer.quantization_mode == "int8"
            for layer in eager_models["int8 MIDL"].layers
        )


def test_ceiling_is_float_bytes_over_int8_bytes():
    assert latency_int8.ceiling(8, 8, 4, 1) == 4 * 64 / (4 * 8 + 4 * 24)
