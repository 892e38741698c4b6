"""Tests of benchmarks.conv and benchmarks.models.conv_cnn: the iso-cost
solver, the three variants' multiply-adds, and a tiny end-to-end run on
generated data (a local .npz this test writes, and TFDS's mock data).
Nothing here reads ../shared or the network."""

import json
import os

import keras
import numpy as np
import pytest

from benchmarks import conv
from benchmarks import datasets
from benchmarks import models
from keras_midl import MIDLConv2D
from keras_midl import flops


@pytest.fixture(autouse=True)
def _no_data_dir_variable(monkeypatch):
    monkeypatch.delenv(datasets.DATA_DIR_VARIABLE, raising=False)


# --- the iso-cost solver ----------------------------------------------------


def _conv_cost(input_shape, num_classes, filters):
    """`conv_cnn`'s multiply-adds by hand: 3x3 same convs, 2x2 pools."""
    height, width, channels = input_shape
    total = 0
    for count in filters:
        total += height * width * 9 * channels * count
        height, width, channels = height // 2, width // 2, count
    return total + height * width * channels * num_classes


def test_iso_cost_width_is_the_largest_within_budget():
    filters = (8, 16, 32)

    def cost(width):
        return _conv_cost((16, 16, 3), 10,
                          models.scaled_filters(filters, width))

    budget = cost(1.0) / 1.7
    width = conv.iso_cost_width(cost, budget)
    assert cost(width) <= budget
    # No width up to 1 gives a model within budget that costs more.
    grid = np.linspace(1e-3, 1.0, 4000)
    best = max(c for c in map(cost, grid) if c <= budget)
    assert cost(width) >= best
    assert cost(width + 1e-6) > budget


def test_iso_cost_width_edges():
    assert conv.iso_cost_width(lambda w: 100 * w, budget=500) == 1.0
    assert conv.iso_cost_width(lambda w: 100 * w, budget=50, high=4.0) == (
        pytest.approx(0.5)
    )
    with pytest.raises(ValueError, match="No width fits"):
        conv.iso_cost_width(lambda w: 10 + w, budget=5)


def test_scaled_filters_round_and_keep_one():
    assert models.scaled_filters((32, 64, 128), 0.75) == (24, 48, 96)
    assert models.scaled_filters((3, 5), 0.01) == (1, 1)


def test_model_cost_is_flops_model_multiply_adds():
    for filters in [(4, 8, 8), (3, 7, 9)]:
        assert conv.model_cost((16, 16, 3), 5, filters) == _conv_cost(
            (16, 16, 3), 5, filters
        )


def test_iso_cost_filters_against_a_midl_budget():
    shape, classes, filters = (16, 16, 3), 10, (8, 16, 32)
    midl = conv.model_cost(shape, classes, filters, "midl", k_ratio=0.45)
    width, scaled, cost = conv.iso_cost_filters(shape, classes, filters, midl)
    assert cost == _conv_cost(shape, classes, scaled) <= midl
    assert scaled == models.scaled_filters(filters, width)
    # The next larger scaled model is above the budget.
    larger = next(
        models.scaled_filters(filters, w)
        for w in np.arange(width, 1.0, 1e-4)
        if models.scaled_filters(filters, w) != scaled
    )
    assert _conv_cost(shape, classes, larger) > midl


# --- the model builder -------------------------------------------------------


def test_variants_of_the_benchmark_cnn():
    shape = (32, 32, 3)
    # Zero kernels: a random initializer compiles per shape on JAX.
    built = {v: models.conv_cnn(shape, 10, v, kernel_initializer="zeros")
             for v in models.CONV_VARIANTS}
    for variant in ("conv", "iso_cost"):
        layers = models.conv_layers(built[variant])
        assert [type(layer) for layer in layers] == [keras.layers.Conv2D] * 3
        assert [layer.filters for layer in layers] == [32, 64, 128]
    layers = models.conv_layers(built["midl"])
    assert [type(layer) for layer in layers] == [
        keras.layers.Conv2D, MIDLConv2D, MIDLConv2D
    ]
    for layer in layers[1:]:
        assert layer.padding == "same" and layer.k_ratio == 0.45
        assert layer.activation is keras.activations.relu
    assert [layer.k for layer in layers[1:]] == [29, 58]
    # The counts the docstring of conv_cnn gives.
    conv_cost = flops.model_multiply_adds(built["conv"])
    midl_cost = flops.model_multiply_adds(built["midl"])
    assert conv_cost == _conv_cost(shape, 10, (32, 64, 128)) == 10_342_400
    assert midl_cost == 884_736 + sum(
        layer.inference_multiply_adds(layer.input.shape)
        for layer in layers[1:]
    ) + 2048 * 10
    assert round(midl_cost / 1e6, 2) == 6.08
    assert conv_cost / midl_cost >= 1.6
    for model in built.values():
        assert model.output.shape == (None, 10)


def test_plan_solves_the_iso_cost_model():
    data = datasets.Dataset("cifar10", np.zeros((2, 32, 32, 3), "float32"),
                            np.zeros(2, "int32"), None, None, 10, "memory")
    args = conv.parse_args([])
    setup = conv.plan(data, args)
    macs = setup["multiply_adds"]
    assert macs["conv"] / macs["midl"] >= 1.6
    assert macs["iso_cost"] <= macs["midl"]
    assert macs["iso_cost"] > 0.98 * macs["midl"]
    assert setup["filters"]["iso_cost"] == models.scaled_filters(
        (32, 64, 128), setup["width"]["iso_cost"]
    )
    types = [layer["type"] for layer in setup["midl_layers"]]
    assert types == ["Conv2D", "MIDLConv2D", "MIDLConv2D"]
    assert all(layer["ratio"] > 1.7 for layer in setup["midl_layers"][1:])


def test_width_and_midl_blocks():
    model = models.conv_cnn((8, 8, 3), 4, "iso_cost", filters=(4, 8),
                            width=0.5, kernel_initializer="zeros")
    assert [layer.filters for layer in models.conv_layers(model)] == [2, 4]
    model = models.conv_cnn((8, 8, 3), 4, "midl", filters=(4, 8),
                            midl_blocks=(0,), k_ratio=0.5,
                            kernel_initializer="zeros")
    assert [type(layer) for layer in models.conv_layers(model)] == [
        MIDLConv2D, keras.layers.Conv2D
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "dense"}, "variant"),
        ({"filters": ()}, "filters"),
        ({"filters": (4, 0)}, "filters"),
        ({"width": 0}, "width"),
        ({"midl_kwargs": [("temperature", 2)]}, "midl_kwargs"),
        ({"midl_kwargs": {"k_ratio": 0.3}}, "must not repeat"),
    ],
)
def test_invalid_builder_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.conv_cnn((8, 8, 3), 4, **{"variant": "midl", **kwargs})


@pytest.mark.parametrize(
    "argv",
    [
        ["--validation-fraction", "0"],
        ["--validation-fraction", "1"],
        ["--train-limit", "0"],
        ["--k-ratio", "0"],
        ["--epochs", "0"],
        ["--filters", "8", "0"],
        ["--datasets", "mnist"],
    ],
)
def test_invalid_arguments_exit(argv):
    with pytest.raises(SystemExit):
        conv.parse_args(argv)


# --- result files ---------------------------------------------------------


def test_merge_keeps_other_keys_and_run_rows():
    old = [
        {"dataset": "cifar10", "backend": "jax", "status": "run", "x": 1},
        {"dataset": "cifar100", "backend": "jax", "status": "run", "x": 2},
    ]
    new = [
        {"dataset": "cifar10", "backend": "jax", "status": "run", "x": 3},
        {"dataset": "cifar100", "backend": "jax", "status": "not run here"},
        {"dataset": "cifar10", "backend": "torch", "status": "run", "x": 4},
    ]
    merged = conv.merge(old, new)
    assert [(r["dataset"], r["backend"], r.get("x")) for r in merged] == [
        ("cifar10", "jax", 3), ("cifar100", "jax", 2),
        ("cifar10", "torch", 4),
    ]


# --- end to end ---------------------------------------------------------------


def _write_cifar10(folder, rng, n_train=80, n_test=8):
    os.makedirs(folder / "cifar10")
    np.savez(
        folder / "cifar10" / "cifar10.npz",
        x_train=rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8),
        y_train=np.arange(n_train) % 10,
        x_test=rng.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8),
        y_test=np.arange(n_test) % 10,
    )


def test_tiny_run_writes_results(tmp_path, rng):
    _write_cifar10(tmp_path / "data", rng)
    output = tmp_path / "out"
    conv.main([
        "--data-dir", str(tmp_path / "data"), "--datasets", "cifar10",
        "cifar100", "--seeds", "0", "--epochs", "1", "--batch-size", "32",
        "--filters", "4", "8", "8", "--train-limit", "32",
        "--output", str(output),
    ])
    payload = json.loads((output / "conv.json").read_text())
    for key in ("command", "backend", "versions", "machine", "load_average",
                "load_average_after"):
        assert key in payload["metadata"]
    rows = {row["dataset"]: row for row in payload["rows"]}
    assert rows["cifar100"]["status"].startswith("not run here")
    row = rows["cifar10"]
    assert row["status"] == "run" and row["backend"] == keras.backend.backend()
    # One batch shape for training and one for evaluation (validation and
    # test both hold 8 images): fewer compilations on JAX.
    assert row["train_examples"] == 32
    assert row["validation_examples"] == 8 and row["test_examples"] == 8
    assert row["seeds"] == [0] and row["epochs"] == 1
    for variant in models.CONV_VARIANTS:
        for where in ("validation", "test"):
            (value,) = row["accuracy_per_seed"][variant][where]
            assert 0.0 <= value <= 1.0
    macs = row["multiply_adds"]
    assert macs["iso_cost"] <= macs["midl"] < macs["conv"]
    assert row["ratio_conv_midl"] == macs["conv"] / macs["midl"]
    assert row["filters"]["conv"] == [4, 8, 8]
    assert row["delta_iso_cost_test"] == pytest.approx(
        100 * (row["accuracy_per_seed"]["midl"]["test"][0]
               - row["accuracy_per_seed"]["iso_cost"]["test"][0])
    )
    markdown = (output / "conv.md").read_text()
    assert "Accuracy per cost" in markdown and "## Per seed" in markdown
    assert "not run here" in markdown


def test_convert_recipe_trains_conv_then_midl(tmp_path, rng, monkeypatch):
    """`--convert-epochs 1`: the MIDL model is the conv model trained for
    `epochs - 1` epochs, converted, then trained 1 epoch; its row is
    keyed apart from the from-scratch one."""
    _write_cifar10(tmp_path / "data", rng)
    output = tmp_path / "out"
    converted = []
    convert = conv.keras_midl.convert

    def spy(model, **kwargs):
        converted.append((model.name, kwargs["layers"]))
        return convert(model, **kwargs)

    monkeypatch.setattr(conv.keras_midl, "convert", spy)
    arguments = [
        "--data-dir", str(tmp_path / "data"), "--datasets", "cifar10",
        "--seeds", "0", "--epochs", "2", "--batch-size", "32",
        "--filters", "4", "8", "8", "--train-limit", "32",
        "--output", str(output),
    ]
    conv.main(arguments + ["--convert-epochs", "1"])
    assert converted == [("conv_cnn_conv", ["conv_1", "conv_2"])]
    conv.main(arguments)  # from scratch: merged beside it
    rows = json.loads((output / "conv.json").read_text())["rows"]
    assert sorted(row["recipe"] for row in rows) == [
        "convert_epochs=1", "scratch"
    ]
    assert "convert_epochs=1" in (output / "conv.md").read_text()
    with pytest.raises(SystemExit):
        conv.main(arguments + ["--convert-epochs", "2"])


def test_svhn_and_cifar100_load_through_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    args = conv.parse_args(["--data-dir", str(tmp_path), "--tfds"])
    with tfds.testing.mock_data(num_examples=12):
        for name, classes in (("svhn_cropped", 10), ("cifar100", 100)):
            data, reason = conv.load(name, args)
            assert reason is None and data.source == "tfds"
            assert data.x_train.shape == (12, 32, 32, 3)
            assert data.num_classes == classes
    # Without --tfds a dataset missing from the folder is not run.
    args = conv.parse_args(["--data-dir", str(tmp_path)])
    data, reason = conv.load("svhn_cropped", args)
    assert data is None and reason.startswith("not run here")
