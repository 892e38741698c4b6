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
                "balance_weight": 0.1}
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
    x_train, y_train, x_eval, y_eval, where = paper_table.splits(data, args)
    assert where == "validation"
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
    x_train, y_train, x_eval, _, where = paper_table.splits(data, args)
    assert where == "test" and len(x_train) == 40
    assert x_eval is data.x_test
    # Not the first 40 rows (which hold class 0 only here).
    assert 0 < y_train.mean() < 1


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
