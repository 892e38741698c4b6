"""Tests of benchmarks.paper_table's helpers (no dataset, tiny models)."""

import json

import keras
import numpy as np
import pytest

from benchmarks import datasets
from benchmarks import models
from benchmarks import paper_table


def test_recipes_parse_settings_over_the_defaults():
    args = paper_table.parse_args([
        "--k-ratio", "0.4", "--recipes", "default",
        "t2:temperature=2", "mix:gate_noise=0.5,rank=7,balance_weight=0.1",
    ])
    defaults = {"rank": None, "temperature": 1.0, "gate_noise": 0.0,
                "balance_weight": 0.1, "width": 1.0, "convert_epochs": 0,
                "warmup_epochs": 0}
    assert args.recipe_list == [
        ("default", {**defaults, "k_ratio": 0.4}),
        ("t2", {**defaults, "k_ratio": 0.4, "temperature": 2.0}),
        ("mix", {**defaults, "k_ratio": 0.4, "rank": 7, "gate_noise": 0.5,
                 "balance_weight": 0.1}),
    ]
    single = paper_table.parse_args(["--recipe", "x", "--temperature", "3"])
    assert single.recipe_list == [
        ("x", {**defaults, "k_ratio": 0.45, "temperature": 3.0}),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--recipes", "a:speed=2"],
        ["--recipes", "a:temperature"],
        ["--recipes", "a", "a"],
        ["--recipes", ":temperature=2"],
        ["--validation-fraction", "1.0"],
        ["--train-limit", "0"],
        ["--recipes", "a:width=0"],
        ["--recipes", "a:convert_epochs=-1"],
        ["--recipes", "a:k_ratio=wide"],
        ["--recipes", "a:convert_epochs=1,warmup_epochs=1"],
    ],
)
def test_invalid_arguments_exit(argv):
    with pytest.raises(SystemExit):
        paper_table.parse_args(argv)


def _data(rng, n_train=200, n_test=50):
    # Labels sorted by class, as in the shared CIFAR-10 test split.
    return datasets.Dataset(
        name="adult",
        x_train=rng.normal(size=(n_train, 6)).astype("float32"),
        y_train=np.sort(rng.integers(0, 2, n_train)).astype("int32"),
        x_test=rng.normal(size=(n_test, 6)).astype("float32"),
        y_test=np.sort(rng.integers(0, 2, n_test)).astype("int32"),
        num_classes=2,
        source="memory",
    )


def test_validation_split_is_held_out_of_training(rng):
    data = _data(rng)
    args = paper_table.parse_args(["--validation-fraction", "0.25"])
    split = paper_table.splits(data, args)
    (x_train, _), (x_eval, y_eval) = split["train"], split["validation"]
    # The test split is still evaluated, for reporting.
    assert split["test"][0] is data.x_test
    assert len(x_eval) == 50 and len(x_train) == 150
    # No example is in both; together they are the training split.
    rows = {tuple(row) for row in x_train}
    assert not rows & {tuple(row) for row in x_eval}
    assert len(rows | {tuple(row) for row in x_eval}) == 200
    # Stratified: the held-out class shares match the training split's.
    share = data.y_train.mean()
    assert abs(y_eval.mean() - share) <= 1 / 50


def test_train_limit_is_a_stratified_subset(rng):
    data = _data(rng)
    args = paper_table.parse_args(["--train-limit", "40"])
    split = paper_table.splits(data, args)
    (x_train, y_train) = split["train"]
    assert sorted(split) == ["test", "train"] and len(x_train) == 40
    assert split["test"][0] is data.x_test
    # Not the first 40 rows (which hold class 0 only here).
    assert 0 < y_train.mean() < 1


def test_recipes_parse_width_k_ratio_at_dense_cost_and_conversion():
    args = paper_table.parse_args([
        "--recipes", "wide:width=2,k_ratio=dense", "c:convert_epochs=3",
    ])
    (_, wide), (_, converted) = args.recipe_list
    assert wide["width"] == 2.0 and wide["k_ratio"] == "dense"
    assert converted["convert_epochs"] == 3


def test_plan_runs_adds_an_iso_cost_dense_per_recipe_cost(rng):
    data = _data(rng)
    args = paper_table.parse_args([
        "--recipes", "default", "t2:temperature=2",
        "wide:width=2,k_ratio=dense",
    ])
    runs, recipes = paper_table.plan_runs("adult", data, args)
    assert recipes == ["default", "t2", "wide"]
    # Same cost, one shared iso-cost run; the wide recipe has its own.
    assert runs["default"]["iso"] == runs["t2"]["iso"]
    assert runs["wide"]["iso"] != runs["default"]["iso"]
    assert runs["wide"]["units"] == (512, 256)
    wide_k = runs["wide"]["settings"]["k_ratio"]
    assert 0 < wide_k < 0.45
    costs = {}
    for key, run in runs.items():
        model = paper_table.build_model("adult", data, run["variant"],
                                        run["settings"], args, run["units"])
        costs[key] = paper_table.flops.model_multiply_adds(model)
    # Each iso-cost Dense is as expensive as its recipe's MIDL, never more,
    # and the wide MIDL is no more expensive than the same-width Dense.
    for recipe in recipes:
        iso = costs[runs[recipe]["iso"]]
        assert iso <= costs[recipe] < 1.02 * iso
    assert costs["wide"] <= costs["baseline"]


def test_a_converted_recipe_trains_dense_then_midl(rng):
    data = _data(rng)
    args = paper_table.parse_args([
        "--validation-fraction", "0.25", "--recipes", "c:convert_epochs=1",
    ])
    split = paper_table.splits(data, args)
    runs, _ = paper_table.plan_runs("adult", data, args)
    model, accuracy, times, _ = paper_table.train_one(
        "adult", data, split, runs["c"], seed=0, epochs=2, args=args
    )
    assert [type(layer).__name__ for layer in
            models.hidden_layers(model)] == ["MIDL", "MIDL"]
    assert sorted(accuracy) == ["test", "validation"] and len(times) == 2
    too_many = paper_table.parse_args(["--recipes", "c:convert_epochs=2"])
    runs, _ = paper_table.plan_runs("adult", data, too_many)
    with pytest.raises(ValueError, match="convert_epochs=2"):
        paper_table.train_one("adult", data, split, runs["c"], seed=0,
                              epochs=2, args=too_many)


def test_gate_health_counts_dead_and_always_on_neurons(rng):
    model = models.mlp((6,), 2, "midl", hidden_units=(8,), k_ratio=0.5)
    (layer,) = models.hidden_layers(model)
    # A gate whose logits ignore the input: the same 4 neurons, always.
    layer.gate_kernel.assign(np.zeros(layer.gate_kernel.shape))
    layer.gate_bias.assign(np.arange(8, dtype="float32"))
    x = rng.normal(size=(30, 6)).astype("float32")
    (health,) = paper_table.gate_health(model, x, np.zeros(30, "int32"))
    assert health["units"] == 8 and health["k"] == 4
    assert health["examples"] == 30
    assert health["dead"] == 4 and health["always_on"] == 4
    assert health["gate_entropy_bits"] == 0.0
    summary = paper_table.aggregate_health([[health], [dict(health,
                                                            dead=2)]])
    assert summary[0]["dead_max"] == 4 and summary[0]["dead_mean"] == 3.0
    assert summary[0]["dead_fraction_max"] == 0.5


def _row(dataset, backend, recipe="default", **extra):
    return {"dataset": dataset, "backend": backend, "recipe": recipe,
            "status": "run", "gate_health": [], "command": "cmd",
            "date": "2026-01-01", "seeds": [0], "target_met": True, **extra}


def test_write_merges_rows_by_dataset_backend_and_recipe(tmp_path):
    args = paper_table.parse_args(["--output", str(tmp_path)])
    metadata = paper_table.common.environment()
    old_prefix = {k: v for k, v in _row("imdb", "jax").items()
                  if k != "gate_health"}
    (tmp_path / "paper_table.json").write_text(json.dumps({"rows": [
        _row("mnist", "jax", note="old"),
        _row("mnist", "torch"),
        old_prefix,  # measured before the gate fix: dropped
    ]}))
    paper_table.write([_row("mnist", "jax", note="new"),
                       _row("adult", "jax", recipe="t2")], metadata, args)
    rows = json.loads((tmp_path / "paper_table.json").read_text())["rows"]
    keys = [(r["dataset"], r["backend"], r["recipe"]) for r in rows]
    assert sorted(keys) == sorted([("mnist", "jax", "default"),
                                   ("mnist", "torch", "default"),
                                   ("adult", "jax", "t2")])
    assert [r["note"] for r in rows if r["backend"] == "jax"
            and r["dataset"] == "mnist"] == ["new"]
    assert (tmp_path / "paper_table.md").exists()


def test_busy_machine_hides_the_epoch_time_ratio():
    row = _row("mnist", "jax", epoch_time_ratio=None)
    assert paper_table._epoch_ratio(row) == "machine busy"
    assert paper_table._epoch_ratio(dict(row, epoch_time_ratio=1.5)) == "1.50"


def test_default_output_is_outside_the_repository():
    import os

    args = paper_table.parse_args([])
    repository = os.path.dirname(os.path.dirname(paper_table.__file__))
    assert not os.path.abspath(args.output).startswith(repository)
    assert keras.backend.backend() in paper_table.BACKENDS


def test_digits_are_the_quickstarts_split():
    args = paper_table.parse_args(["--datasets", "digits"])
    data, reason = paper_table.load("digits", args)
    assert reason is None
    assert data.x_train.shape == (1347, 64) and data.x_test.shape == (450, 64)
    assert data.num_classes == 10 and 0 <= data.x_train.min()
    assert data.x_train.max() <= 1
    assert paper_table.batch_size("digits", args) == 32
    assert paper_table.batch_size("mnist", args) == 128
