"""Tests of benchmarks.models: baseline and MIDL variants per benchmark."""

import keras
import numpy as np
import pytest

from benchmarks import models
from keras_midl import MIDL
from keras_midl import flops
from keras_midl.lowrank import default_rank

SMALL = {
    "mnist": ((6, 6, 1), 10, {}),
    "adult": ((12,), 2, {}),
    "cifar10": ((8, 8, 3), 10, {"filters": (2, 4)}),
    "cifar100": ((8, 8, 3), 100, {"filters": (2, 4)}),
    "svhn_cropped": ((8, 8, 3), 10, {"filters": (2, 4)}),
    "imdb": ((9,), 2, {"vocabulary_size": 30, "embedding_dim": 8}),
}


def build_small(name, variant, **kwargs):
    input_shape, num_classes, extra = SMALL[name]
    hidden = (16, 8) if models.ARCHITECTURES[name][0] != "cnn" else (16,)
    return models.build(
        name,
        variant,
        input_shape,
        num_classes,
        hidden_units=hidden,
        **{**extra, **kwargs},
    )


def test_every_benchmark_has_an_architecture():
    from benchmarks import datasets
    from benchmarks import paper_table

    # The datasets of benchmarks.datasets, and the quickstart's digits,
    # which benchmarks.paper_table loads from scikit-learn itself.
    assert sorted(models.ARCHITECTURES) == sorted(
        (*datasets.NAMES, "digits")
    )
    assert set(models.ARCHITECTURES) == set(paper_table.ORDER)


# One benchmark per architecture (mlp, cnn, text_mlp) keeps the suite fast.
@pytest.mark.parametrize("name", ["adult", "cifar100", "imdb"])
def test_variants_differ_only_in_hidden_layers(name):
    baseline = build_small(name, "baseline")
    midl = build_small(name, "midl", k_ratio=0.5)
    base_hidden = models.hidden_layers(baseline)
    midl_hidden = models.hidden_layers(midl)
    assert base_hidden and len(base_hidden) == len(midl_hidden)
    assert all(type(layer) is keras.layers.Dense for layer in base_hidden)
    assert all(isinstance(layer, MIDL) for layer in midl_hidden)
    assert [layer.units for layer in base_hidden] == [
        layer.units for layer in midl_hidden
    ]
    others = [
        (type(layer), layer.output.shape)
        for layer in baseline.layers
        if not layer.name.startswith("hidden_")
    ]
    assert others == [
        (type(layer), layer.output.shape)
        for layer in midl.layers
        if not layer.name.startswith("hidden_")
    ]
    assert midl.output.shape == (None, SMALL[name][1])
    assert flops.active_fraction(midl) == 0.5
    assert flops.active_fraction(baseline) == 1.0


@pytest.mark.parametrize("name", ["mnist", "imdb", "cifar10"])
def test_models_forward_in_training_and_inference(name):
    # Eager calls: compiling a train step costs a minute on a busy CPU.
    model = build_small(name, "midl", k_ratio=0.5)
    input_shape, num_classes, _ = SMALL[name]
    rng = np.random.default_rng(0)
    if name == "imdb":
        x = rng.integers(0, 30, (4, *input_shape)).astype("int32")
    else:
        x = rng.random((4, *input_shape)).astype("float32")
    for training in (True, False):
        probabilities = keras.ops.convert_to_numpy(model(x, training=training))
        assert probabilities.shape == (4, num_classes)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_mnist_architecture_and_flops():
    # The benchmark model: 784-512-256-10 with the default rank per layer.
    baseline = models.build("mnist", "baseline", (28, 28, 1), 10)
    midl = models.build("mnist", "midl", (28, 28, 1), 10, k_ratio=0.45)
    assert [layer.units for layer in models.hidden_layers(midl)] == [512, 256]
    ranks = [layer.effective_rank for layer in models.hidden_layers(midl)]
    assert ranks == [default_rank(784, 512), default_rank(512, 256)]
    assert ranks == [22, 12]
    dense_hidden = 784 * 512 + 512 * 256
    midl_hidden = (784 * 22 + 2 * 22 * 512 + 230 * 784) + (
        512 * 12 + 2 * 12 * 256 + 115 * 512
    )
    counts = dict((name, count) for name, _, count in flops.layer_counts(midl))
    assert counts["hidden_0"] + counts["hidden_1"] == midl_hidden
    assert flops.model_multiply_adds(baseline) == dense_hidden + 256 * 10
    assert dense_hidden / midl_hidden >= 1.7


@pytest.mark.parametrize(
    "d, n, expected",
    [(784, 512, 22), (105, 256, 4), (4096, 4096, 32), (2, 2, 1)],
)
def test_default_rank_budget(d, n, expected):
    rank = default_rank(d, n)
    assert rank == expected
    if 1 < rank < 32:
        assert rank * (d + 2 * n) <= 0.1 * d * n
        assert (rank + 1) * (d + 2 * n) > 0.1 * d * n


def test_explicit_rank_and_k_ratio():
    model = models.mlp(
        (10,), 3, "midl", hidden_units=(20,), k_ratio=0.25, rank=3
    )
    (layer,) = models.hidden_layers(model)
    assert layer.effective_rank == 3 and layer.k == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "sparse"}, "variant"),
        ({"hidden_units": ()}, "hidden_units"),
        ({"hidden_units": (8, 0)}, "hidden_units"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.mlp((4,), 2, **kwargs)


def test_unknown_benchmark_and_missing_vocabulary():
    with pytest.raises(ValueError, match="name='fashion'"):
        models.build("fashion", "baseline", (4,), 2)
    with pytest.raises(ValueError, match="vocabulary_size"):
        models.build("imdb", "baseline", (9,), 2)
    with pytest.raises(ValueError, match="overhead"):
        default_rank(10, 10, overhead=1.5)


@pytest.mark.parametrize("name", ["adult", "cifar10", "imdb"])
def test_midl_kwargs_reach_every_midl_layer(name):
    model = build_small(name, "midl", k_ratio=0.5,
                        midl_kwargs={"temperature": 2.5, "gate_noise": 0.3})
    for layer in models.hidden_layers(model):
        assert layer.temperature == 2.5 and layer.gate_noise == 0.3
    # The baseline ignores them: its hidden layers are plain Dense.
    baseline = build_small(name, "baseline", midl_kwargs={"temperature": 2})
    assert all(type(layer) is keras.layers.Dense
               for layer in models.hidden_layers(baseline))


@pytest.mark.parametrize(
    "midl_kwargs, match",
    [
        ([("temperature", 2.0)], "midl_kwargs"),
        ({"k_ratio": 0.3}, "must not repeat"),
        ({"units": 4}, "must not repeat"),
    ],
)
def test_invalid_midl_kwargs(midl_kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.mlp((4,), 2, "midl", hidden_units=(8,),
                   midl_kwargs=midl_kwargs)
