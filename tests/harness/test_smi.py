"""Tests of benchmarks.smi on tiny synthetic data (no shared data)."""

import json
import sys

import numpy as np

from benchmarks import smi
from tests.harness.fake_data import write_mnist


def test_every_representation_is_estimated(tmp_path, rng, monkeypatch):
    write_mnist(tmp_path / "data", rng)
    # The estimator is tested in tests/test_analysis.py; scikit-learn's kNN
    # takes about 20 s here for the 15 estimates.
    widths = []

    def estimate(features, labels, num_projections, seed):
        widths.append(features.shape[1])
        return float(np.mean(features))

    monkeypatch.setattr(smi, "sliced_mutual_information", estimate)
    output = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "smi", "--data-dir", str(tmp_path / "data"), "--seeds", "1",
        "--hidden", "16", "8", "--train-size", "30", "--epochs", "1",
        "--batch-size", "10", "--examples", "40", "--projections", "4",
        "--output", str(output),
    ])
    smi.main()
    payload = json.loads((output / "smi.json").read_text())
    rows = payload["rows"]
    assert [r["representation"] for r in rows] == 2 * list(
        smi.REPRESENTATIONS
    )
    iso = payload["settings"]["iso_cost_hidden"]
    for row in rows:
        if row["representation"] == "iso_cost":
            assert row["units_mean"] == iso[row["layer"]]
        else:
            assert row["units_mean"] == (16, 8)[row["layer"]]
        assert np.isfinite(row["smi_mean"])
    # The pixels, then each layer's representations.
    assert widths == [16, *[r["units_mean"] for r in rows]]
    per_seed = payload["per_seed"]
    accuracy = {r["representation"]: r["test_accuracy"] for r in per_seed}
    assert accuracy["dense"] == accuracy["dense_top_k"]
    assert accuracy["midl"] == accuracy["midl_selected"]


def test_each_representation_comes_from_its_model():
    assert [smi.model_of(name) for name in smi.REPRESENTATIONS] == [
        "dense", "dense", "iso_cost", "midl", "midl", "midl", "midl",
    ]
