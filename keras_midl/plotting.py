"""Pictures of MIDL gates: selection-frequency histogram and class heat map.

Uses matplotlib's object-oriented API (`matplotlib.figure.Figure`), never
`pyplot`: nothing here changes matplotlib's global backend or state, and
PNG files are written with the Agg renderer on any machine, with or
without a display. Needs `pip install matplotlib` (part of the `dev` and
`examples` extras).

Example:

>>> import keras_midl.plotting
>>> model = keras.Sequential([
...     keras.Input((8,)), keras_midl.MIDL(16, k_ratio=0.5, name="midl")])
>>> x = np.random.default_rng(0).normal(size=(200, 8)).astype("float32")
>>> labels = (x[:, 0] > 0).astype("int32")
>>> stats = keras_midl.gate_statistics(model, x)["midl"]
>>> figure = keras_midl.plotting.save_gate_plots(
...     stats, "gates.png", labels=labels)
"""

import numpy as np

from keras_midl.analysis import selection_by_class
from keras_midl.inspection import GateStatistics


def _new_axes(ncols=1, width=5.0, height=3.6):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover
        raise ImportError(
            "keras_midl.plotting needs matplotlib: `pip install matplotlib`."
        ) from error
    figure = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _check_statistics(statistics):
    if not isinstance(statistics, GateStatistics):
        raise ValueError(
            "Expected one GateStatistics, e.g. "
            "`keras_midl.gate_statistics(model, x)['layer_name']`. "
            f"Received: statistics={statistics!r}"
        )


def plot_selection_histogram(statistics, ax=None, bins=20):
    """Histogram of the neurons' selection frequencies.

    A spike at 0 shows dead full-path neurons, a spike at 1 always-on ones;
    a gate that spreads its `k` selections over all neurons piles up around
    the dashed line at `k / units`.

    Args:
        statistics: One `GateStatistics` from `keras_midl.gate_statistics`.
        ax: Matplotlib `Axes` to draw on; a new figure when `None`.
        bins: Number of bins over `[0, 1]`.

    Returns:
        The matplotlib `Axes`.
    """
    _check_statistics(statistics)
    if ax is None:
        _, (ax,) = _new_axes()
    frequency = np.asarray(statistics.selection_frequency, dtype=float)
    ax.hist(frequency, bins=np.linspace(0.0, 1.0, bins + 1), color="C0")
    ax.axvline(
        statistics.active_fraction,
        color="C3",
        linestyle="--",
        label=f"k / units = {statistics.active_fraction:.2f}",
    )
    dead = int(np.sum(frequency == 0))
    always_on = int(np.sum(frequency == 1))
    ax.set_title(
        f"{statistics.layer_name}: {frequency.size} neurons, "
        f"{dead} dead, {always_on} always on"
    )
    ax.set_xlabel("selection frequency (fraction of inputs)")
    ax.set_ylabel("neurons")
    ax.set_xlim(0.0, 1.0)
    ax.legend(loc="upper right")
    return ax


def plot_class_selection_heatmap(
    statistics, labels, ax=None, class_names=None, sort_neurons=True
):
    """Class-by-neuron heat map of the per-class selection frequency.

    Cell `(c, j)` is the fraction of the examples of class `c` for which
    neuron `j` took the full path (`keras_midl.analysis.selection_by_class`).
    Vertical stripes are neurons whose selection ignores the class; bright
    cells in one row only are class-specific neurons.

    Args:
        statistics: One `GateStatistics` from `keras_midl.gate_statistics`.
        labels: Integer class labels of the same examples, shape
            `(num_examples,)`.
        ax: Matplotlib `Axes` to draw on; a new figure when `None`.
        class_names: Optional names of the rows.
        sort_neurons: If `True`, order the neurons by the class that selects
            them most, then by overall frequency, so that class-specific
            blocks become visible.

    Returns:
        The matplotlib `Axes`.
    """
    _check_statistics(statistics)
    if ax is None:
        _, (ax,) = _new_axes(width=7.0)
    pattern = selection_by_class(statistics, labels)
    if sort_neurons:
        filled = np.nan_to_num(pattern, nan=-1.0)
        order = np.lexsort((-filled.mean(axis=0), filled.argmax(axis=0)))
        pattern = pattern[:, order]
    image = ax.imshow(
        pattern,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
    )
    ax.figure.colorbar(image, ax=ax, label="selection frequency")
    num_classes = pattern.shape[0]
    ax.set_yticks(np.arange(num_classes))
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(
                f"Expected {num_classes} `class_names`. "
                f"Received: {len(class_names)}"
            )
        ax.set_yticklabels(class_names)
    ax.set_ylabel("class")
    ax.set_xlabel("neuron" + (" (sorted by preferred class)" * sort_neurons))
    ax.set_title(f"{statistics.layer_name}: selection by class")
    return ax


def save_gate_plots(statistics, path, labels=None, class_names=None, dpi=120):
    """Writes the histogram, and the heat map when labels are given, to PNG.

    Args:
        statistics: One `GateStatistics` from `keras_midl.gate_statistics`.
        path: File path of the PNG (any format matplotlib infers from the
            extension).
        labels: Optional integer class labels for the heat map.
        class_names: Optional names of the classes.
        dpi: Resolution.

    Returns:
        The matplotlib `Figure` (already saved).
    """
    _check_statistics(statistics)
    figure, axes = _new_axes(ncols=1 if labels is None else 2)
    plot_selection_histogram(statistics, ax=axes[0])
    if labels is not None:
        plot_class_selection_heatmap(
            statistics, labels, ax=axes[1], class_names=class_names
        )
    figure.savefig(path, dpi=dpi)
    return figure
