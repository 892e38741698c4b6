"""Tests of benchmarks.tune_k_ratio on tiny synthetic data (no shared
data)."""

import json

import pytest

from benchmarks import tune_k_ratio
from tests.harness.fake_data import write_mnist


@pytest.mark.parametrize("units", [64, 256])
@pytest.mark.parametrize("fraction", [0.2, 0.55, 0.95])
def test_iso_cost_dense_costs_at_most_the_fraction(units, fraction):
    iso = tune_k_ratio.iso_cost_dense_units(units, fraction)
    cost = tune_k_ratio.dense_model_cost
    assert iso < units
    assert cost(iso) <= fraction * cost(units) < cost(iso + 1)


def midl_row(k_ratio, fraction, accuracy, best=False):
    return {
        "model": "MIDL", "trial": str(k_ratio), "k_ratio": k_ratio,
        "units": 256, "epochs": 1, "val_accuracy": accuracy,
        "val_accuracy_std": 0.0, "val_accuracies": [accuracy],
        "flops_fraction": fraction, "flops_saving": 1 / fraction,
        "objective": accuracy - 0.1 * fraction, "best": best,
    }


def test_each_cheaper_trial_gets_the_dense_of_its_cost(monkeypatch):
    args = tune_k_ratio.parse_args(["--units", "256", "--executions", "2"])
    trained = []

    def train_dense(args, data, units):
        trained.append(units)
        return [0.9, 0.92]

    monkeypatch.setattr(tune_k_ratio, "train_dense", train_dense)
    midl = [midl_row(0.1, 0.21, 0.91, best=True), midl_row(1.0, 1.1, 0.92)]
    rows = tune_k_ratio.iso_cost_rows(args, None, midl)
    # The trial above the Dense cost has no narrower Dense.
    assert [r["model"] for r in rows] == ["MIDL", "Dense, same cost", "MIDL"]
    iso = rows[1]
    assert trained == [iso["units"]] == [
        tune_k_ratio.iso_cost_dense_units(256, 0.21)
    ]
    assert iso["k_ratio"] == 0.1
    assert iso["flops_fraction"] <= 0.21
    assert iso["val_accuracy"] == pytest.approx(0.91)
    assert iso["objective"] == pytest.approx(0.91 - 0.1 * iso["flops_fraction"])
    table = tune_k_ratio.format_table(rows)
    assert f"| Dense, same cost | 0.10 | {iso['units']} |" in table
    text = tune_k_ratio.iso_cost_comparison(rows)
    assert "+0.00 points" in text and f"({iso['units']} hidden units)" in text


def test_search_writes_both_dense_baselines(tmp_path, rng):
    write_mnist(tmp_path / "data", rng, train=80, test_per_class=2, side=28)
    output = tmp_path / "out"
    tune_k_ratio.main([
        "--data-dir", str(tmp_path / "data"), "--units", "64",
        "--k-min", "0.5", "--k-max", "1.0", "--k-step", "0.5",
        "--max-trials", "2", "--epochs", "1", "--executions", "1",
        "--train-size", "40", "--val-size", "20", "--batch-size", "20",
        "--output", str(output),
    ])
    payload = json.loads((output / "tune_k_ratio.json").read_text())
    models = [row["model"] for row in payload["rows"]]
    assert models.count("MIDL") == 2 and models[-1] == "Dense"
    # k_ratio 0.5 costs less than Dense at 64 units; 1.0 costs more.
    assert models.count("Dense, same cost") == 1
    assert "Best objective" in payload["summary"]["iso_cost_comparison"]
    assert (output / "tune_k_ratio.png").exists()
