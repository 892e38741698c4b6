"""Tests of benchmarks.convert's accuracy part on tiny synthetic data (no
shared data)."""

import json

import keras
import pytest

import keras_midl
from benchmarks import convert
from benchmarks import models
from keras_midl import flops
from tests.harness.fake_data import write_mnist


@pytest.mark.parametrize(
    "name, input_shape", [("mnist", (784,)), ("cifar10", (32, 32, 3))]
)
@pytest.mark.parametrize("k_ratio", [0.25])
def test_iso_cost_dense_costs_at_most_the_converted_model(
    name, input_shape, k_ratio
):
    dense = models.build(name, "baseline", input_shape, 10)
    converted = keras_midl.convert(dense, k_ratio=k_ratio)
    widths = convert.iso_cost_hidden(dense, converted)
    base = [layer.units for layer in models.hidden_layers(dense)]
    assert all(w < u for w, u in zip(widths, base))
    iso = models.build(name, "baseline", input_shape, 10, hidden_units=widths)
    wider = models.build(
        name, "baseline", input_shape, 10,
        hidden_units=[w + 1 for w in widths],
    )
    budget = flops.model_multiply_adds(converted)
    assert flops.model_multiply_adds(iso) <= budget
    assert flops.model_multiply_adds(wider) > budget


def test_accuracy_run_reports_the_iso_cost_dense(tmp_path, rng):
    write_mnist(tmp_path / "data", rng, train=40, test_per_class=2, side=28)
    output = tmp_path / "out"
    convert.main([
        "--data-dir", str(tmp_path / "data"), "--datasets", "mnist",
        "--seeds", "0", "--k-ratios", "0.45", "--full-k-ratios", "1.0",
        "--epochs", "1", "--train-limit", "40", "--output", str(output),
    ])
    payload = json.loads((output / "convert.json").read_text())
    (row,) = payload["rows"]
    assert 0.0 <= row["iso_cost_acc"] <= 1.0
    dense = models.build("mnist", "baseline", (784,), 10)
    keras.utils.set_random_seed(0)
    converted = keras_midl.convert(dense, k_ratio=0.45)
    assert row["iso_cost_hidden"] == list(
        convert.iso_cost_hidden(dense, converted)
    )
    (summary,) = payload["summary"]
    mean, std = summary["calibrated_vs_iso_cost"]
    assert mean == pytest.approx(
        100 * (row["calibrated_acc"] - row["iso_cost_acc"])
    )
    assert "Calibrated − iso-cost Dense" in (output / "convert.md").read_text()
