"""Tests of keras_midl.analysis (SMI, gate statistics) and keras_midl.plotting.

The SMI estimator is checked against known answers: independent features
(about 0), features that determine the label (the label entropy), and
Gaussian mixtures whose (sliced) mutual information is computed by
numerical integration to about 1e-10 nats.
"""

import json

import keras
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from keras_midl import MIDL
from keras_midl import gate_statistics
from keras_midl.analysis import GateSummary
from keras_midl.analysis import class_selection_information
from keras_midl.analysis import effective_neurons
from keras_midl.analysis import gate_entropy
from keras_midl.analysis import label_entropy
from keras_midl.analysis import selection_by_class
from keras_midl.analysis import sliced_mutual_information
from keras_midl.analysis import summarize_gates
from keras_midl.inspection import GateStatistics
from keras_midl.plotting import plot_class_selection_heatmap
from keras_midl.plotting import plot_selection_histogram
from keras_midl.plotting import save_gate_plots

# --- Reference values by numerical integration ------------------------------


def mixture_mi_quad(means, sigma, weights):
    """I(X; Y) for X | Y=c ~ N(means[c], sigma^2), by adaptive quadrature.

    I = h(X) - h(X | Y), with h(X | Y) = log(2 pi e sigma^2) / 2.
    """
    means = np.asarray(means, dtype=float)
    weights = np.asarray(weights, dtype=float)

    def integrand(x):
        density = np.sum(weights * stats.norm.pdf(x, means, sigma))
        return -density * np.log(density) if density > 0 else 0.0

    entropy, _ = integrate.quad(
        integrand,
        means.min() - 12 * sigma,
        means.max() + 12 * sigma,
        points=sorted(means),
        epsabs=1e-12,
        epsrel=1e-12,
        limit=500,
    )
    return entropy - 0.5 * np.log(2 * np.pi * np.e * sigma**2)


def mixture_mi_grid(means, sigma, weights, num_points=20001):
    """Vectorized `mixture_mi_quad` for many mixtures (rows of `means`).

    The trapezoidal rule on a fine grid over +-12 sigma; checked against
    quadrature in `test_reference_grid_matches_quadrature`.
    """
    means = np.atleast_2d(np.asarray(means, dtype=float))
    x = np.linspace(
        means.min() - 12 * sigma, means.max() + 12 * sigma, num_points
    )
    pdf = stats.norm.pdf(x[None, None, :], means[:, :, None], sigma)
    density = np.einsum("c,acx->ax", np.asarray(weights, dtype=float), pdf)
    safe = np.where(density > 0, density, 1.0)
    entropy = -np.trapezoid(density * np.log(safe), x, axis=-1)
    return entropy - 0.5 * np.log(2 * np.pi * np.e * sigma**2)


def mixture_smi_2d(means, sigma, weights, num_angles=64):
    """SMI of an isotropic 2-D Gaussian mixture with the class.

    A projection theta = (cos a, sin a) gives the 1-D mixture with means
    `means @ theta` and the same sigma; I(a) has period pi, so the
    trapezoidal rule over equally spaced angles converges exponentially.
    """
    angles = np.arange(num_angles) * np.pi / num_angles
    directions = np.stack([np.cos(angles), np.sin(angles)])
    projected_means = (np.asarray(means, dtype=float) @ directions).T
    return float(np.mean(mixture_mi_grid(projected_means, sigma, weights)))


MEANS_1D = [-1.0, 0.5, 2.0]
WEIGHTS_1D = [0.5, 0.3, 0.2]
MEANS_2D = [[0.0, 0.0], [2.0, 0.0], [0.0, 1.5]]
WEIGHTS_2D = [1 / 3, 1 / 3, 1 / 3]


def sample_mixture(means, weights, num_examples, rng):
    means = np.asarray(means, dtype=float)
    labels = rng.choice(len(weights), size=num_examples, p=weights)
    features = rng.normal(means[labels], 1.0)
    return features, labels


def test_reference_grid_matches_quadrature():
    quad = mixture_mi_quad(MEANS_1D, 1.0, WEIGHTS_1D)
    grid = mixture_mi_grid(MEANS_1D, 1.0, WEIGHTS_1D)[0]
    assert abs(quad - grid) < 1e-9
    # Angular rule converged: doubling the angles changes nothing.
    coarse = mixture_smi_2d(MEANS_2D, 1.0, WEIGHTS_2D, num_angles=32)
    fine = mixture_smi_2d(MEANS_2D, 1.0, WEIGHTS_2D, num_angles=64)
    assert abs(coarse - fine) < 1e-9


# --- Sliced mutual information: known answers --------------------------------


def test_smi_independent_features_is_about_zero(rng):
    features = rng.normal(size=(1500, 16))
    labels = rng.integers(0, 10, size=1500)
    smi = sliced_mutual_information(features, labels, 32, seed=0)
    # Clipping each slice at 0 leaves a small positive bias (~0.006).
    assert 0.0 <= smi < 0.02


@pytest.mark.parametrize("num_features", [1, 8])
def test_smi_label_determining_features_reach_label_entropy(rng, num_features):
    labels = rng.choice(4, size=2000, p=[0.4, 0.3, 0.2, 0.1])
    centers = rng.normal(size=(4, num_features))
    features = centers[labels] + 1e-3 * rng.normal(size=(2000, num_features))
    smi = sliced_mutual_information(features, labels, 16, seed=0)
    entropy = label_entropy(labels)
    assert abs(smi - entropy) < 0.02
    assert abs(entropy - 1.2799) < 0.02  # close to the population entropy


def test_smi_one_dimensional_gaussian_mixture_matches_integral(rng):
    reference = mixture_mi_quad(MEANS_1D, 1.0, WEIGHTS_1D)  # 0.41654 nats
    features, labels = sample_mixture(MEANS_1D, WEIGHTS_1D, 20000, rng)
    smi = sliced_mutual_information(features, labels, 1, seed=0)
    assert abs(smi - reference) < 0.02
    # Nats, not bits: in bits the estimate would be 0.60.
    assert abs(reference - 0.41654) < 1e-4


def test_smi_two_dimensional_gaussian_mixture_matches_integral(rng):
    reference = mixture_smi_2d(MEANS_2D, 1.0, WEIGHTS_2D)  # 0.25190 nats
    features, labels = sample_mixture(MEANS_2D, WEIGHTS_2D, 3000, rng)
    smi = sliced_mutual_information(features, labels, 48, seed=0)
    assert abs(smi - reference) < 0.04
    # SMI is below the full MI of the 2-D mixture, which no single slice
    # reaches here.
    assert reference < 0.33


def test_smi_is_invariant_to_feature_scale_and_label_names(rng):
    features = rng.normal(size=(600, 5))
    labels = (features[:, 0] + 0.5 * rng.normal(size=600) > 0).astype(int)
    base = sliced_mutual_information(features, labels, 8, seed=3)
    scaled = sliced_mutual_information(1000.0 * features, labels, 8, seed=3)
    names = np.where(labels == 1, "cat", "dog")
    renamed = sliced_mutual_information(features, names, 8, seed=3)
    one_hot = sliced_mutual_information(features, np.eye(2)[labels], 8, seed=3)
    assert base > 0.05
    np.testing.assert_allclose([scaled, renamed, one_hot], base, atol=1e-6)


def test_smi_seed_and_per_projection(rng):
    features = rng.normal(size=(400, 6))
    labels = (features[:, :2].sum(axis=1) > 0).astype(int)
    first, per_projection = sliced_mutual_information(
        features, labels, 12, seed=7, return_per_projection=True
    )
    again = sliced_mutual_information(features, labels, 12, seed=7)
    other = sliced_mutual_information(features, labels, 12, seed=8)
    assert per_projection.shape == (12,)
    assert np.all(per_projection >= 0)
    assert first == again
    assert first != other
    assert first == pytest.approx(per_projection.mean())


def test_smi_accepts_backend_tensors_and_image_shaped_features(rng):
    features = rng.normal(size=(300, 2, 3)).astype("float32")
    labels = (features[:, 0, 0] > 0).astype("int32")
    expected = sliced_mutual_information(
        features.reshape(300, 6), labels, 8, seed=1
    )
    result = sliced_mutual_information(
        keras.ops.convert_to_tensor(features),
        keras.ops.convert_to_tensor(labels),
        8,
        seed=1,
    )
    assert result == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_projections": 0}, "num_projections"),
        ({"num_projections": 2.5}, "num_projections"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"labels": np.zeros(7)}, "one entry per example"),
        ({"labels": np.zeros((10, 2, 2))}, "labels"),
        ({"features": np.full((10, 3), np.nan)}, "non-finite"),
        ({"features": np.zeros((3, 2)), "labels": np.zeros(3)}, "examples"),
    ],
)
def test_smi_invalid_arguments(kwargs, message):
    arguments = {"features": np.zeros((10, 3)), "labels": np.zeros(10)}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sliced_mutual_information(**arguments)


def test_label_entropy():
    assert label_entropy([0, 1, 2, 3]) == pytest.approx(np.log(4))
    assert label_entropy([5, 5, 5]) == 0.0
    assert label_entropy(np.eye(2)[[0, 0, 0, 1]]) == pytest.approx(
        -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    )


# --- Gate statistics ------------------------------------------------------


def make_statistics(mask, name="midl"):
    mask = np.asarray(mask, dtype="float32")
    units = mask.shape[-1]
    return GateStatistics(
        layer_name=name,
        logits=np.zeros_like(mask),
        mask=mask,
        selection_frequency=mask.reshape(-1, units).mean(axis=0),
        active_fraction=float(mask.reshape(-1, units)[0].sum() / units),
    )


def class_specific_mask(labels, units=8):
    """Class c selects neurons 2c and 2c + 1 (k = 2)."""
    mask = np.zeros((len(labels), units), dtype="float32")
    mask[np.arange(len(labels)), 2 * labels] = 1
    mask[np.arange(len(labels)), 2 * labels + 1] = 1
    return mask


def test_selection_by_class_exact():
    labels = np.array([0, 0, 1, 1, 1, 3])
    mask = np.array(
        [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]], dtype="float32"
    )
    pattern = selection_by_class(make_statistics(mask), labels)
    expected = [[0.5, 0.5], [2 / 3, 1 / 3], [np.nan, np.nan], [0.0, 1.0]]
    np.testing.assert_allclose(pattern, expected)
    padded = selection_by_class(mask, labels, num_classes=5)
    assert padded.shape == (5, 2)
    assert np.all(np.isnan(padded[4]))


def test_selection_by_class_averages_inner_positions():
    mask = np.zeros((2, 4, 3), dtype="float32")  # (examples, steps, units)
    mask[0, :, 0] = 1
    mask[1, :2, 1] = 1
    mask[1, 2:, 2] = 1
    pattern = selection_by_class(mask, np.array([0, 1]))
    np.testing.assert_allclose(pattern, [[1, 0, 0], [0, 0.5, 0.5]])


@pytest.mark.parametrize(
    "labels, num_classes, message",
    [
        (np.array([0.0, 1.0]), None, "integer"),
        (np.array([0]), None, "one entry per example"),
        (np.array([0, -1]), None, "non-negative"),
        (np.array([0, 3]), 3, "num_classes"),
    ],
)
def test_selection_by_class_invalid(labels, num_classes, message):
    with pytest.raises(ValueError, match=message):
        selection_by_class(np.eye(2), labels, num_classes=num_classes)


def test_static_gate_has_zero_entropy_and_k_effective_neurons():
    mask = np.tile([1, 1, 0, 0, 0], (50, 1))
    stats = make_statistics(mask)
    assert gate_entropy(stats) == 0.0
    assert effective_neurons(stats) == pytest.approx(2.0)
    labels = np.arange(50) % 5
    assert class_selection_information(stats, labels) == 0.0


def test_balanced_gate_reaches_maximum_entropy():
    # Each of 4 neurons is selected by exactly half of the rows (k = 2).
    mask = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    stats = make_statistics(np.tile(mask, (10, 1)))
    assert gate_entropy(stats) == pytest.approx(1.0)
    assert effective_neurons(stats) == pytest.approx(4.0)
    assert gate_entropy(stats.selection_frequency) == pytest.approx(1.0)


def test_class_selection_information_known_values(rng):
    labels = np.repeat(np.arange(4), 250)
    specific = class_specific_mask(labels)
    # Each neuron is on for one class of four: I(m_j; Y) = H_b(1/4).
    expected = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    assert class_selection_information(specific, labels) == pytest.approx(
        expected
    )
    shuffled = specific[rng.permutation(len(labels))]
    assert class_selection_information(shuffled, labels) < 0.01


def test_invalid_frequency_raises():
    with pytest.raises(ValueError, match="selection frequency"):
        gate_entropy(np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="selection frequency"):
        effective_neurons(np.zeros((2, 2)))


def test_summarize_gates_on_a_midl_layer(rng):
    # gate_statistics(layer, ...) evaluates the gate alone, eagerly: a
    # model's predict() would compile a probe model, which takes seconds.
    first = MIDL(16, k_ratio=0.25, selection="top_k", name="midl_a")
    second = MIDL(8, k_ratio=0.5, selection="top_k", name="midl_b")
    first.build((None, 12))
    second.build((None, 16))
    inputs = rng.normal(size=(64, 12)).astype("float32")
    hidden = rng.normal(size=(64, 16)).astype("float32")
    labels = rng.integers(0, 3, size=64)
    stats = {
        **gate_statistics(first, inputs),
        **gate_statistics(second, hidden),
    }
    summaries = summarize_gates(stats, labels)
    assert set(summaries) == {"midl_a", "midl_b"}
    summary = summaries["midl_a"]
    assert isinstance(summary, GateSummary)
    assert summary.units == 16
    assert summary.num_rows == 64
    assert summary.active_fraction == 0.25
    assert summary.num_dead == stats["midl_a"].dead_neurons.size
    assert summary.num_always_on == stats["midl_a"].always_on_neurons.size
    assert 4.0 - 1e-6 <= summary.effective_neurons <= 16.0 + 1e-6
    assert 0.0 <= summary.gate_entropy_bits <= summary.max_gate_entropy_bits
    assert summary.max_gate_entropy_bits == pytest.approx(
        -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))
    )
    assert summary.class_information_bits >= 0.0
    # Each field against its formula, from the mask by hand.
    mask = stats["midl_a"].mask.astype("float64")
    frequency = mask.mean(axis=0)
    np.testing.assert_allclose(stats["midl_a"].selection_frequency, frequency)
    usage = frequency[frequency > 0] / frequency.sum()
    assert summary.effective_neurons == pytest.approx(
        np.exp(-np.sum(usage * np.log(usage)))
    )
    assert summary.gate_entropy_bits == pytest.approx(
        np.mean(binary_entropy(frequency))
    )
    assert summary.num_dead == np.sum(frequency == 0)
    assert summary.num_always_on == np.sum(frequency == 1)
    per_class = np.array([mask[labels == c].mean(axis=0) for c in range(3)])
    weights = np.bincount(labels, minlength=3) / len(labels)
    information = binary_entropy(frequency) - weights @ binary_entropy(
        per_class
    )
    assert summary.class_information_bits == pytest.approx(information.mean())
    json.dumps(summary.to_dict())
    single = summarize_gates(stats["midl_b"])
    assert single.class_information_bits is None
    assert single.units == 8
    with pytest.raises(ValueError, match="gate_statistics"):
        summarize_gates({"x": np.zeros(3)})


def binary_entropy(p):
    """H_b(p) in bits, 0 at p = 0 and p = 1 (a reference for the tests)."""
    p = np.asarray(p, dtype="float64")
    q = np.clip(p, 1e-300, 1.0)
    r = np.clip(1.0 - p, 1e-300, 1.0)
    return -(p * np.log2(q) + (1.0 - p) * np.log2(r))


def test_summary_fields_by_hand():
    """A mask whose every summary field is known in closed form.

    Class 0 selects neurons {0, 1} in every row; class 1 selects {0, 2} in
    half of its rows and {0, 3} in the other half. Frequencies (1, 1/2,
    1/4, 1/4).
    """
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mask = np.array(
        [[1, 1, 0, 0]] * 4 + [[1, 0, 1, 0], [1, 0, 0, 1]] * 2,
        dtype="float32",
    )
    summary = summarize_gates(make_statistics(mask), labels)
    h_quarter = -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))  # 0.8113
    assert summary.units == 4 and summary.num_rows == 8
    assert summary.active_fraction == 0.5
    assert summary.num_dead == 0 and summary.num_always_on == 1
    # mean(H_b(1), H_b(1/2), H_b(1/4), H_b(1/4))
    assert summary.gate_entropy_bits == pytest.approx((1 + 2 * h_quarter) / 4)
    assert summary.max_gate_entropy_bits == pytest.approx(1.0)
    # usage (1/2, 1/4, 1/8, 1/8): entropy 1.75 bits, exp -> 2 ** 1.75.
    assert summary.effective_neurons == pytest.approx(2**1.75)
    # I(m_j; Y): 0, 1, H_b(1/4) - 1/2, H_b(1/4) - 1/2 bits.
    assert summary.class_information_bits == pytest.approx(
        (1 + 2 * (h_quarter - 0.5)) / 4
    )


# --- Plots -------------------------------------------------------------------


def test_save_gate_plots_writes_png(tmp_path):
    labels = np.repeat(np.arange(4), 25)
    stats = make_statistics(class_specific_mask(labels))
    with_heatmap = tmp_path / "gates.png"
    histogram_only = tmp_path / "histogram.png"
    figure = save_gate_plots(
        stats, with_heatmap, labels=labels, class_names=list("abcd")
    )
    save_gate_plots(stats, histogram_only)
    assert len(figure.axes) == 3  # histogram, heat map, color bar
    for path in (with_heatmap, histogram_only):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_heatmap_sorts_neurons_by_preferred_class():
    labels = np.repeat(np.arange(4), 10)
    mask = class_specific_mask(labels)[:, ::-1]  # class 0 -> last neurons
    ax = plot_class_selection_heatmap(make_statistics(mask), labels)
    image = ax.images[0].get_array()
    # After sorting, class c lights up columns 2c and 2c + 1: block diagonal.
    np.testing.assert_allclose(image, np.repeat(np.eye(4), 2, axis=1))
    histogram_ax = plot_selection_histogram(make_statistics(mask))
    assert "0 dead" in histogram_ax.get_title()


def test_plots_reject_other_inputs():
    with pytest.raises(ValueError, match="GateStatistics"):
        plot_selection_histogram({"midl": None})
    labels = np.arange(2)
    stats = make_statistics(np.eye(2))
    with pytest.raises(ValueError, match="class_names"):
        plot_class_selection_heatmap(stats, labels, class_names=["a"])
