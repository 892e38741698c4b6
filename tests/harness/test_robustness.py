"""Tests of benchmarks.robustness on tiny synthetic data (no shared data)."""

import json
import sys

import numpy as np
import pytest

from benchmarks import robustness
from tests.harness.fake_data import write_mnist


def tiny_run(tmp_path, rng, monkeypatch, gate_examples=40):
    """Runs `robustness.main()` on a tiny MNIST-like folder whose test
    split is sorted by class; returns the output folder."""
    write_mnist(tmp_path / "data", rng)
    output = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "robustness", "--data-dir", str(tmp_path / "data"), "--seeds", "1",
        "--hidden", "8", "4", "--train-size", "30", "--epochs", "1",
        "--label-noise", "0", "--sigmas", "0", "--small-size", "20",
        "--small-epochs", "1", "--batch-size", "10",
        "--gate-examples", str(gate_examples), "--output", str(output),
    ])
    robustness.main()
    return output


def test_gate_statistics_use_every_class_of_a_sorted_test_split(
    tmp_path, rng, monkeypatch
):
    # Audit defect 8: the first 2,000 rows of the (class-sorted) CIFAR-10
    # test split hold classes 0-3 only. The gate statistics must see every
    # class, in proportion.
    seen = []
    summarize = robustness.summarize_gates

    def spy(statistics, labels=None):
        seen.append(np.asarray(labels))
        return summarize(statistics, labels)

    monkeypatch.setattr(robustness, "summarize_gates", spy)
    monkeypatch.setattr(robustness, "save_gate_plots", lambda *a, **k: None)
    # Only the MIDL model has gates: skip the others to keep the test fast.
    monkeypatch.setattr(robustness, "MODEL_KINDS", ("midl",))
    output = tiny_run(tmp_path, rng, monkeypatch)
    assert len(seen) == 1
    np.testing.assert_array_equal(np.bincount(seen[0], minlength=10),
                                  [4] * 10)
    # Results go to --output only.
    payload = json.loads((output / "robustness.json").read_text())
    assert payload["settings"]["gate_class_counts"] == [4] * 10
    assert (output / "robustness.md").exists()


@pytest.mark.parametrize("size", [10, 40, 80])
def test_gate_subset_is_stratified_and_fixed(size):
    labels = np.repeat(np.arange(10), 8)
    index = robustness.gate_subset(labels, size)
    assert len(np.unique(index)) == size
    np.testing.assert_array_equal(
        np.bincount(labels[index], minlength=10), [size // 10] * 10
    )
    np.testing.assert_array_equal(index, robustness.gate_subset(labels, size))


def test_gate_subset_larger_than_the_split_takes_all():
    labels = np.repeat(np.arange(3), 2)
    index = robustness.gate_subset(labels, 100)
    np.testing.assert_array_equal(np.sort(index), np.arange(6))


@pytest.mark.parametrize(
    "input_dim, hidden",
    [(784, (512, 256)), (3072, (512, 256)), (784, (1024, 512))],
)
def test_iso_cost_mlp_costs_at_most_the_midl_mlp(input_dim, hidden):
    midl = robustness.flops.model_multiply_adds(
        robustness.build_mlp("midl", input_dim, 10, hidden)
    )
    iso = robustness.build_mlp("iso_cost", input_dim, 10, hidden)
    widths = robustness.iso_cost_hidden(input_dim, 10, hidden)
    assert [layer.units for layer in iso.layers[:-1]] == list(widths)
    # MIDL at k_ratio 0.5 costs less than the Dense of its width.
    assert all(w < h for w, h in zip(widths, hidden))
    cost = robustness.flops.model_multiply_adds(iso)
    # At most the MIDL model's cost, and within one unit's worth of it.
    assert midl - (input_dim + hidden[-1] + 10) <= cost <= midl


def test_every_model_kind_is_reported(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(robustness, "save_gate_plots", lambda *a, **k: None)
    output = tiny_run(tmp_path, rng, monkeypatch, gate_examples=20)
    payload = json.loads((output / "robustness.json").read_text())
    assert [row["model"] for row in payload["rows"]] == list(
        robustness.MODEL_KINDS
    )
    assert [row["model"] for row in payload["small_data"]] == list(
        robustness.MODEL_KINDS
    )
    costs = payload["settings"]["multiply_adds"]
    # (MIDL layers this small cost more than Dense: iso_cost is wider.)
    assert costs["dense"] < costs["iso_cost"] <= costs["midl"]
    assert "| iso_cost |" in (output / "robustness.md").read_text()
