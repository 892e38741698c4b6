"""Tests of benchmarks.training_step's helpers (tiny models, no timing)."""

import argparse

import numpy as np
from keras import ops

from benchmarks import training_step


def test_timed_rows_give_ratios_to_dense():
    args = argparse.Namespace(warmup=0, repeats=3)
    rows = training_step.timed_rows(
        {"Dense": lambda: None, "MIDL": lambda: sum(range(10_000))},
        args,
        case="c",
        model="m",
        batch=2,
    )
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["Dense"]["ratio_to_dense"] == 1.0
    assert by_variant["MIDL"]["ratio_to_dense"] > 1.0
    assert {row["case"] for row in rows} == {"c"}
    assert all(row["page_faults"] is None or row["page_faults"] >= 0
               for row in rows)


def test_ratios_to_the_faster_dense_layout():
    """A faster Dense in MIDL's layout is the baseline of `/ best dense`
    (a masked MIDL must not look cheaper than the matmul it contains)."""
    args = argparse.Namespace(warmup=0, repeats=3)
    rows = training_step.timed_rows(
        {"Dense": lambda: sum(range(20_000)),
         "Dense, W^T layout": lambda: None,
         "MIDL": lambda: sum(range(10_000))},
        args,
        case="c",
        model="m",
        batch=2,
    )
    by_variant = {row["variant"]: row for row in rows}
    assert by_variant["Dense, W^T layout"]["ratio_to_best_dense"] == 1.0
    assert by_variant["MIDL"]["ratio_to_dense"] < 1.0
    assert by_variant["MIDL"]["ratio_to_best_dense"] > 1.0


def test_the_transposed_dense_computes_dense(rng):
    layer = training_step.transposed_dense()(6, activation="relu")
    x = rng.normal(size=(3, 5)).astype("float32")
    layer(x)
    kernel = ops.convert_to_numpy(layer.kernel)
    np.testing.assert_allclose(
        ops.convert_to_numpy(layer(x, training=False)),
        np.maximum(x @ kernel.T, 0),
        rtol=1e-5, atol=1e-6,
    )


def test_finish_rows_flag_targets_and_load():
    row = {"case": "train_on_batch", "model": "MLP 784-1024-1024-10",
           "batch": 256, "ms": 1.0, "load_before": 0.5, "load_after": 0.7}
    outputs = {"jax": {"rows": [
        {**row, "variant": "Dense", "ratio_to_dense": 1.0,
         "ratio_to_best_dense": 1.0},
        {**row, "variant": "MIDL", "ratio_to_dense": 1.0,
         "ratio_to_best_dense": 1.25},
        {**row, "variant": "MIDL", "ratio_to_dense": 1.0,
         "ratio_to_best_dense": 1.35, "load_after": 1.1},
    ]}}
    dense, met, missed = training_step.finish_rows(outputs)
    assert dense["target_met"] is None and dense["valid"] == "yes"
    assert met["target"] == 1.3 and met["target_met"] == "yes"
    assert missed["target_met"] == "no" and missed["valid"] == "no (load)"


def test_profile_layers_replace_the_selection_and_the_mix(rng):
    layers = training_step.profile_layers()
    x = rng.normal(size=(4, 12)).astype("float32")
    fixed = layers["fixed mask"](10, k_ratio=0.3)
    fixed(x)
    mask = ops.convert_to_numpy(fixed.gate(x)["mask"])
    np.testing.assert_array_equal(mask, np.tile([1.0] * 3 + [0.0] * 7, (4, 1)))
    plain = layers["fixed mask, plain mix"](10, k_ratio=0.3)
    plain(x)
    plain.set_weights(fixed.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(plain(x, training=True)),
        ops.convert_to_numpy(fixed(x, training=True)),
        rtol=1e-6,
    )


def test_profile_rank_16_variant_builds_rank_16_layers():
    model = training_step.mlp((32,), training_step.profile_layers()["rank 16"])
    midl = model.layers[0]
    assert midl.effective_rank == 16 and midl.k == 14
    assert midl.get_config()["rank"] == 16


def test_jit_compile_reaches_every_model():
    from keras_midl import MIDL

    for layer_class in (None, MIDL):
        model = training_step.mlp((8,), layer_class, jit_compile=True)
        assert model.jit_compile is True
    args = training_step.parse_args(["--jit-compile"])
    assert args.jit_compile
