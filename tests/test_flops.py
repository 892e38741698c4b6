"""Tests of keras_midl.flops against hand counts."""

import keras
import pytest

from keras_midl import MIDL
from keras_midl import MIDLConv2D
from keras_midl import flops


def zero_weights(*layers):
    """Counts do not depend on weight values; zeros build fast on JAX,
    where each new random-initializer shape compiles."""
    for layer in layers:
        for name in (
            "kernel_initializer",
            "depthwise_initializer",
            "pointwise_initializer",
            "embeddings_initializer",
        ):
            if hasattr(layer, name):
                setattr(layer, name, keras.initializers.Zeros())
    return layers


def sequential(input_shape, *layers):
    return keras.Sequential([keras.Input(input_shape), *zero_weights(*layers)])


def test_design_example_midl_vs_dense():
    # DESIGN.md: d=784, n=512, r=32, k_ratio=0.45 -> 238k vs 401k, 1.69x.
    midl = sequential((784,), MIDL(512, k_ratio=0.45, rank=32))
    dense = sequential((784,), keras.layers.Dense(512))
    k = 230
    assert flops.model_multiply_adds(midl) == 784 * 32 + 2 * 32 * 512 + k * 784
    assert flops.model_multiply_adds(midl) == 238_176
    assert flops.model_multiply_adds(dense) == 401_408
    assert flops.flops_ratio(dense, midl) == pytest.approx(401_408 / 238_176)
    assert flops.flops_ratio(dense, midl) == pytest.approx(1.685, abs=1e-3)


def test_midl_zero_light_path():
    layer = MIDL(100, k_ratio=0.25, rank=8, light_path="zero")
    model = sequential((40,), layer)
    assert flops.model_multiply_adds(model) == 40 * 8 + 8 * 100 + 25 * 40


def test_midl_default_rank_is_counted():
    # default rank: floor(0.1 * 64 * 32 / (64 + 2 * 32)) = 1
    model = sequential((64,), MIDL(32, k_ratio=0.5))
    assert flops.model_multiply_adds(model) == 64 * 1 + 2 * 1 * 32 + 16 * 64


@pytest.mark.parametrize(
    "layer_fn, expected",
    [
        (lambda: keras.layers.Dense(3), 7 * 5 * 3),
        (lambda: MIDL(8, k_ratio=0.5, rank=2), 7 * (5 * 2 + 2 * 2 * 8 + 4 * 5)),
    ],
)
def test_dense_and_midl_count_every_position(layer_fn, expected):
    model = sequential((7, 5), layer_fn())
    assert flops.model_multiply_adds(model) == expected


def test_layer_multiply_adds_with_explicit_shape():
    (layer,) = zero_weights(keras.layers.Dense(512))
    layer.build((None, 784))
    assert flops.layer_multiply_adds(layer, input_shape=(None, 784)) == 401_408


def test_conv2d_valid_and_same_padding():
    model = sequential(
        (32, 32, 3),
        keras.layers.Conv2D(16, 3),  # 30x30 output
        keras.layers.Conv2D(8, (3, 5), padding="same", strides=2),  # 15x15
    )
    counts = [c for _, _, c in flops.layer_counts(model)]
    assert counts == [30 * 30 * 3 * 3 * 3 * 16, 15 * 15 * 3 * 5 * 16 * 8]


def test_grouped_depthwise_and_separable_conv():
    model = sequential(
        (8, 8, 4),
        keras.layers.Conv2D(6, 3, padding="same", groups=2),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2),  # 6x6x12
        keras.layers.SeparableConv2D(5, 3),  # 4x4x5, depth_multiplier 1
    )
    counts = [c for _, _, c in flops.layer_counts(model)]
    assert counts == [
        8 * 8 * 9 * 2 * 6,
        6 * 6 * 9 * 6 * 2,
        4 * 4 * 9 * 12 + 4 * 4 * 12 * 5,
    ]


def test_conv1d():
    model = sequential((20, 4), keras.layers.Conv1D(7, 5))
    assert flops.model_multiply_adds(model) == 16 * 5 * 4 * 7


def test_small_cnn_total_and_zero_cost_layers():
    model = sequential(
        (28, 28, 1),
        keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, activation="relu"),  # 26x26x4
        keras.layers.BatchNormalization(),
        keras.layers.MaxPooling2D(),  # 13x13x4
        keras.layers.Dropout(0.5),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    )
    expected = 26 * 26 * 9 * 1 * 4 + 13 * 13 * 4 * 10
    assert flops.model_multiply_adds(model) == expected


def test_embedding_pooling_mlp():
    model = sequential(
        (50,),
        keras.layers.Embedding(1000, 16),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(1),
    )
    assert flops.model_multiply_adds(model) == 16 * 32 + 32 * 1


def test_nested_model_recurses():
    inner = sequential(
        (10,), keras.layers.Dense(6), MIDL(4, k_ratio=0.5, rank=4)
    )
    outer = sequential((10,), inner, keras.layers.Dense(2))
    inner_count = 10 * 6 + (6 * 4 + 2 * 4 * 4 + 2 * 6)
    assert flops.layer_multiply_adds(inner) == inner_count
    assert flops.model_multiply_adds(outer) == inner_count + 4 * 2
    names = [name for name, _, _ in flops.layer_counts(outer)]
    assert names[0].startswith(inner.name + "/")


def test_functional_model_with_branches():
    inputs = keras.Input((12,))
    left_layer, right_layer, head = zero_weights(
        keras.layers.Dense(5), keras.layers.Dense(3), keras.layers.Dense(2)
    )
    branches = [left_layer(inputs), right_layer(inputs)]
    merged = keras.layers.Concatenate()(branches)
    outputs = head(merged)
    model = keras.Model(inputs, outputs)
    assert flops.model_multiply_adds(model) == 12 * 5 + 12 * 3 + 8 * 2


@pytest.mark.parametrize(
    "k_ratio_a, k_ratio_b, expected",
    [(0.5, 0.5, 0.5), (0.25, 0.75, (25 + 150) / (100 + 200)), (1.0, 1.0, 1.0)],
)
def test_active_fraction_weighted_by_units(k_ratio_a, k_ratio_b, expected):
    model = sequential(
        (10,),
        MIDL(100, k_ratio=k_ratio_a),
        MIDL(200, k_ratio=k_ratio_b),
        keras.layers.Dense(3),
    )
    assert flops.active_fraction(model) == pytest.approx(expected)


def test_active_fraction_without_midl_is_one():
    model = sequential((10,), keras.layers.Dense(3))
    assert flops.active_fraction(model) == 1.0


def test_unknown_layer_raises_with_class_name():
    class Mystery(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    model = sequential((4,), Mystery(), keras.layers.Dense(2))
    with pytest.raises(ValueError, match="Mystery"):
        flops.model_multiply_adds(model)


def test_register_multiply_adds():
    class Scaled(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    flops.register_multiply_adds(Scaled, lambda layer, shape: shape[-1])
    try:
        model = sequential((4,), Scaled(), keras.layers.Dense(2))
        assert flops.model_multiply_adds(model) == 4 + 8
    finally:
        flops._CUSTOM_RULES.pop(Scaled)


def test_register_rejects_non_layer():
    with pytest.raises(ValueError, match="layer_class"):
        flops.register_multiply_adds(int, lambda layer, shape: 0)


def test_undefined_axis_raises():
    model = sequential((None, 5), keras.layers.Dense(3))
    with pytest.raises(ValueError, match="undefined"):
        flops.model_multiply_adds(model)


def test_unbuilt_layer_without_shape_raises():
    with pytest.raises(ValueError, match="input shape"):
        flops.layer_multiply_adds(keras.layers.Dense(3))


def test_summary_lists_layers_and_total():
    model = sequential(
        (784,),
        MIDL(512, k_ratio=0.45, rank=32, name="m"),
        keras.layers.Dense(10, name="head"),
    )
    printed = []
    text = flops.summary(model, print_fn=printed.append)
    assert printed == [text]
    lines = text.splitlines()
    assert lines[1].split() == ["m", "MIDL", "238,176", "401,408"]
    assert lines[2].split() == ["head", "Dense", "5,120", "5,120"]
    assert lines[3].split() == ["total", "243,296", "406,528"]
    assert lines[4] == "FLOPs fraction: 0.598; MIDL active fraction: 0.449"


# --- Dense-equivalent count and FLOPs fraction --------------------------------


@pytest.mark.parametrize(
    "input_shape, rows", [((784,), 1), ((7, 784), 7), ((2, 3, 784), 6)]
)
def test_dense_equivalent_counts_midl_as_dense(input_shape, rows):
    # DESIGN.md: d=784, n=512, r=32, k_ratio=0.45 -> 238,176 vs 401,408.
    model = sequential(
        input_shape,
        MIDL(512, k_ratio=0.45, rank=32),
        keras.layers.Dense(10),
    )
    midl, head = model.layers
    assert flops.dense_equivalent_multiply_adds(midl) == rows * 784 * 512
    assert flops.dense_equivalent_multiply_adds(head) == rows * 512 * 10
    assert flops.dense_multiply_adds(model) == rows * (784 * 512 + 512 * 10)
    assert [c for _, _, c in flops.layer_counts(model, True)] == [
        rows * 784 * 512,
        rows * 512 * 10,
    ]
    # Both counts scale with the rows; the fraction does not.
    assert flops.flops_fraction(model) == pytest.approx(
        (238176 + 5120) / (401408 + 5120)
    )


def test_dense_equivalent_with_explicit_shape_and_unbuilt_layer():
    layer = MIDL(64, k_ratio=0.5, rank=4)
    assert flops.dense_equivalent_multiply_adds(layer, (None, 3, 10)) == (
        3 * 10 * 64
    )
    with pytest.raises(ValueError, match="input shape"):
        flops.dense_equivalent_multiply_adds(layer)


@pytest.mark.parametrize("k_ratio", [0.25, 0.5, 1.0])
def test_flops_fraction_matches_formula(k_ratio):
    d, n, r, classes = 16, 32, 4, 2
    model = sequential(
        (d,), MIDL(n, k_ratio=k_ratio, rank=r), keras.layers.Dense(classes)
    )
    k = round(k_ratio * n)
    midl = d * r + 2 * r * n + k * d
    assert flops.flops_fraction(model) == pytest.approx(
        (midl + n * classes) / (d * n + n * classes)
    )


def test_flops_fraction_of_nested_and_midl_free_models():
    inner = sequential((20,), MIDL(40, k_ratio=0.5, rank=2, name="m"))
    outer = keras.Sequential([keras.Input((20,)), inner, keras.layers.Dense(5)])
    zero_weights(*outer.layers[1:])
    midl = 20 * 2 + 2 * 2 * 40 + 20 * 20
    assert flops.dense_multiply_adds(outer) == 20 * 40 + 40 * 5
    assert flops.dense_equivalent_multiply_adds(inner) == 20 * 40
    assert flops.flops_fraction(outer) == pytest.approx(
        (midl + 200) / (800 + 200)
    )
    assert flops.flops_fraction(sequential((4,), keras.layers.Dense(3))) == 1


def test_flops_fraction_of_a_zero_cost_model_raises():
    model = sequential((4,), keras.layers.ReLU())
    with pytest.raises(ValueError, match="FLOPs fraction is undefined"):
        flops.flops_fraction(model)


# Budgets: stack costs, iso-cost widths, k_ratio within a budget.


def midl_stack(input_dim, units, k_ratio, rank=None, light_path="lowrank",
               output_units=None):
    layers = [
        MIDL(n, k_ratio=k_ratio, rank=rank, light_path=light_path)
        for n in units
    ]
    if output_units:
        layers.append(keras.layers.Dense(output_units))
    return sequential((input_dim,), *layers)


def dense_stack(input_dim, units, output_units=None):
    layers = [keras.layers.Dense(n) for n in units]
    if output_units:
        layers.append(keras.layers.Dense(output_units))
    return sequential((input_dim,), *layers)


@pytest.mark.parametrize(
    "input_dim,units,output_units",
    [(784, (512, 256), None), (64, (256, 128), 10), (105, (7,), 2)],
)
def test_dense_stack_multiply_adds_matches_the_model(
    input_dim, units, output_units
):
    model = dense_stack(input_dim, units, output_units)
    assert flops.dense_stack_multiply_adds(
        input_dim, units, output_units
    ) == flops.model_multiply_adds(model)


@pytest.mark.parametrize(
    "units,k_ratio,rank,light_path,output_units",
    [
        ((512, 256), 0.45, None, "lowrank", None),
        ((256, 128), 0.3, 8, "zero", 10),
        ((33,), 0.01, None, "lowrank", 2),
    ],
)
def test_midl_stack_multiply_adds_matches_the_model(
    units, k_ratio, rank, light_path, output_units
):
    model = midl_stack(96, units, k_ratio, rank, light_path, output_units)
    assert flops.midl_stack_multiply_adds(
        96, units, k_ratio, rank, light_path, output_units
    ) == flops.model_multiply_adds(model)


@pytest.mark.parametrize(
    "input_dim,units,output_units",
    [(784, (512, 256), 10), (64, (256, 128), 10), (2048, (256,), 10),
     (128, (256, 128), None), (105, (256, 128), 2)],
)
@pytest.mark.parametrize("k_ratio", [0.25, 0.45, 0.8])
def test_iso_cost_units_meet_the_budget_from_below(
    input_dim, units, output_units, k_ratio
):
    budget = flops.midl_stack_multiply_adds(
        input_dim, units, k_ratio, output_units=output_units
    )
    widths = flops.iso_cost_units(input_dim, units, budget, output_units)
    assert len(widths) == len(units)
    cost = flops.dense_stack_multiply_adds(input_dim, widths, output_units)
    assert cost <= budget
    # Proportional, and as wide as the budget allows: one more unit per
    # layer would exceed it.
    ratios = [w / u for w, u in zip(widths, units)]
    assert max(ratios) - min(ratios) < 2 / min(units) + 1e-9
    wider = tuple(w + 1 for w in widths)
    assert flops.dense_stack_multiply_adds(
        input_dim, wider, output_units
    ) > budget


def test_iso_cost_units_of_a_dense_cost_are_the_units():
    budget = flops.dense_stack_multiply_adds(784, (512, 256), 10)
    assert flops.iso_cost_units(784, (512, 256), budget, 10) == (512, 256)
    assert flops.iso_cost_units(784, (512, 256), 2 * budget, 10) > (512, 256)


def test_k_ratio_for_budget_is_the_largest_within_it():
    budget = flops.dense_stack_multiply_adds(784, (512, 256))
    k_ratio = flops.k_ratio_for_budget(784, (1024, 512), budget)
    assert flops.midl_stack_multiply_adds(
        784, (1024, 512), k_ratio
    ) <= budget
    assert flops.midl_stack_multiply_adds(
        784, (1024, 512), round(k_ratio + 0.01, 2)
    ) > budget
    assert flops.k_ratio_for_budget(784, (512, 256), 10 * budget) == 1.0


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: flops.iso_cost_units(784, (512,), 100), "budget=100"),
        (lambda: flops.iso_cost_units(784, (512,), 0), "budget=0"),
        (lambda: flops.iso_cost_units(784, (512,), float("nan")),
         "budget=nan"),
        (lambda: flops.iso_cost_units(0, (512,), 1e6), "input_dim=0"),
        (lambda: flops.iso_cost_units(784, (), 1e6), r"units=\(\)"),
        (lambda: flops.iso_cost_units(784, (512, 0), 1e6), "units="),
        (lambda: flops.iso_cost_units(784, (512,), 1e6, output_units=0),
         "output_units=0"),
        (lambda: flops.k_ratio_for_budget(784, (512,), 1000), "budget=1000"),
        (lambda: flops.k_ratio_for_budget(784, (512,), 1e6, step=0),
         "step=0"),
        (lambda: flops.midl_stack_multiply_adds(784, (512,), 1.5),
         "k_ratio=1.5"),
        (lambda: flops.midl_stack_multiply_adds(784, (512,), 0.5, rank=0),
         "rank=0"),
        (lambda: flops.midl_stack_multiply_adds(
            784, (512,), 0.5, light_path="none"), "light_path='none'"),
    ],
)
def test_budget_functions_name_the_invalid_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- MIDLConv2D ---------------------------------------------------------------


def midl_conv_cnn(data_format="channels_last", light_path="lowrank"):
    """Conv stem, MIDLConv2D(16) with k = 6, pooling, Dense head."""
    shape = (10, 10, 3) if data_format == "channels_last" else (3, 10, 10)
    return sequential(
        shape,
        keras.layers.Conv2D(8, 3, data_format=data_format, name="stem"),
        MIDLConv2D(
            16,
            3,
            k_ratio=0.375,
            rank=2,
            padding="same",
            light_path=light_path,
            data_format=data_format,
            name="midl_conv",
        ),
        keras.layers.GlobalAveragePooling2D(data_format=data_format),
        keras.layers.Dense(4, name="head"),
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("light_path", ["lowrank", "zero"])
def test_midl_conv2d_counts(data_format, light_path):
    model = midl_conv_cnn(data_format, light_path)
    stem = 8 * 8 * 27 * 8  # 8x8 output pixels
    # MIDLConv2D on 8x8x8, same padding: 64 pixels, patch 72, r = 2, k = 6.
    gate = 8 * 2 + 2 * 16
    light = 64 * (72 * 2 + 2 * 16) if light_path == "lowrank" else 0
    full = 64 * 72 * 6
    head = 16 * 4
    midl_conv = model.get_layer("midl_conv")
    assert flops.layer_multiply_adds(midl_conv) == gate + light + full
    assert flops.model_multiply_adds(model) == stem + gate + light + full + head
    as_conv = 64 * 72 * 16
    assert flops.dense_equivalent_multiply_adds(midl_conv) == as_conv
    assert flops.dense_multiply_adds(model) == stem + as_conv + head
    assert flops.active_fraction(model) == 6 / 16
    assert flops.flops_fraction(model) == pytest.approx(
        (stem + gate + light + full + head) / (stem + as_conv + head)
    )


def test_midl_conv2d_dense_equivalent_is_the_conv2d_count():
    layer = MIDLConv2D(12, (3, 2), strides=2, k_ratio=0.5)
    conv = keras.layers.Conv2D(12, (3, 2), strides=2)
    shape = (None, 9, 9, 5)
    assert flops.dense_equivalent_multiply_adds(
        layer, input_shape=shape
    ) == flops.layer_multiply_adds(conv, input_shape=shape)


def test_midl_conv2d_in_summary_and_active_fraction_with_midl():
    model = sequential(
        (6, 6, 3),
        MIDLConv2D(8, 3, k_ratio=0.5, rank=1, name="c"),
        keras.layers.Flatten(),
        MIDL(8, k_ratio=0.25, rank=2, name="m"),
    )
    text = flops.summary(model, print_fn=lambda text: None)
    row = text.splitlines()[1].split()
    assert row[:2] == ["c", "MIDLConv2D"]
    # k = 4 of 8 filters and 2 of 8 units.
    assert flops.active_fraction(model) == 6 / 16
    assert text.splitlines()[-1].endswith("MIDL active fraction: 0.375")


def test_midl_conv2d_with_undefined_spatial_axes_raises():
    model = sequential((None, None, 3), MIDLConv2D(4, 3, name="c"))
    with pytest.raises(ValueError, match="undefined axes"):
        flops.model_multiply_adds(model)
