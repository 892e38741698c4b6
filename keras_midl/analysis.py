"""Analysis of what MIDL layers learn: Sliced Mutual Information and gates.

Everything here works on concrete arrays, after training: NumPy arrays or
backend tensors (converted with `keras.ops.convert_to_numpy`). It is
analysis code, not layer code, so it uses NumPy and scikit-learn
(`pip install scikit-learn`, part of the `dev` and `examples` extras).

* `sliced_mutual_information`: how much a representation (a layer's
  activations) tells about the class labels, in nats.
* `label_entropy`: its upper bound `H(Y)`, in nats.
* `selection_by_class`, `gate_entropy`, `effective_neurons`,
  `class_selection_information`, `summarize_gates`: what a MIDL gate does,
  built on `keras_midl.inspection.gate_statistics`.

Plots of the same statistics are in `keras_midl.plotting`.
"""

import dataclasses

import keras
import numpy as np

from keras_midl.inspection import GateStatistics


def _to_numpy(value):
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        return np.asarray(value)
    return keras.ops.convert_to_numpy(value)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _class_indices(labels, num_rows):
    """Labels (integers, any hashable values, or one-hot) to 0..C-1."""
    labels = _to_numpy(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = np.argmax(labels, axis=1)  # one-hot or probabilities
    elif labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            "Expected `labels` of shape (num_examples,), (num_examples, 1) "
            "or one-hot (num_examples, num_classes). "
            f"Received: labels.shape={labels.shape}"
        )
    if labels.shape[0] != num_rows:
        raise ValueError(
            "`labels` must have one entry per example: expected "
            f"{num_rows} labels. Received: labels.shape={labels.shape}"
        )
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise ValueError("Received non-finite values in `labels`.")
    _, classes = np.unique(labels, return_inverse=True)
    return classes.reshape(-1)


def label_entropy(labels):
    """Entropy `H(Y) = -sum_c p(c) log p(c)` of the labels, in nats.

    The upper bound of any mutual information with the labels, such as
    `sliced_mutual_information`.

    Example:

    >>> keras_midl.analysis.label_entropy([0, 1, 2, 3])  # log(4)
    1.3862943611198906

    Args:
        labels: Class labels, shape `(num_examples,)`, or one-hot.

    Returns:
        Python float, in nats.
    """
    labels = _to_numpy(labels)
    classes = _class_indices(labels, len(labels))
    probabilities = np.bincount(classes) / len(classes)
    probabilities = probabilities[probabilities > 0]
    return float(-np.sum(probabilities * np.log(probabilities)))


def sliced_mutual_information(
    features,
    labels,
    num_projections=128,
    n_neighbors=3,
    seed=None,
    return_per_projection=False,
):
    """Sliced Mutual Information between features and class labels, in nats.

    ```
    SMI(X; Y) = E_theta [ I(theta^T X ; Y) ],  theta ~ Uniform(unit sphere)
    ```

    estimated by drawing `num_projections` random unit directions `theta`,
    projecting the features on each, estimating the one-dimensional mutual
    information between the projection (continuous) and the label
    (discrete), and averaging over the directions (Goldfeld & Greenewald,
    "Sliced Mutual Information: A Scalable Measure of Statistical
    Dependence", NeurIPS 2021).

    The one-dimensional estimator is the k-nearest-neighbour estimator of
    Ross (2014) for a continuous and a discrete variable, as implemented by
    scikit-learn's `mutual_info_classif` (an adaptation of Kraskov et al.
    2004). For each example with label `c`: `d` is the distance to its
    `n_neighbors`-th nearest neighbour among the examples of class `c`,
    `m` the number of examples of any class within `d`, `N_c` the size of
    class `c`, and

    ```
    I = psi(N) - mean(psi(N_c)) + psi(n_neighbors) - mean(psi(m))
    ```

    with `psi` the digamma function. Like scikit-learn, each projection is
    divided by its standard deviation (MI is invariant to that), a tiny
    Gaussian noise (`1e-10` times the mean absolute value) breaks ties, and
    a negative estimate is replaced by 0; so independent features give a
    small positive value (about 0.005 nats with 2,000 examples), not 0.
    Estimates are in nats and at most `label_entropy(labels)`.

    Ties: when many examples share exactly the same projection (for
    example all-zero activation vectors), the noise orders them at random
    and the estimate of that slice is unreliable; drop such rows or read
    the result with care.

    Cost: about `num_projections` one-dimensional nearest-neighbour
    searches over all examples. A few thousand examples and 64 to 256
    projections are typical.

    Example:

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 2, size=500)
    >>> informative = labels[:, None] + 0.1 * rng.normal(size=(500, 4))
    >>> noise = rng.normal(size=(500, 4))
    >>> smi = keras_midl.analysis.sliced_mutual_information
    >>> bool(smi(informative, labels, seed=0) > smi(noise, labels, seed=0))
    True

    Args:
        features: Array or backend tensor of shape `(num_examples, ...)`;
            all axes after the first are flattened into one feature vector.
            A 1-D array is one feature.
        labels: Class labels of shape `(num_examples,)` (integers or any
            discrete values), `(num_examples, 1)`, or one-hot of shape
            `(num_examples, num_classes)`.
        num_projections: Positive integer, the number of random directions.
        n_neighbors: Positive integer, the `k` of the nearest-neighbour
            estimator (scikit-learn's default 3). Larger values lower the
            variance and raise the bias.
        seed: Integer or `None`: seed of the directions and of the
            tie-breaking noise. The same seed gives the same result.
        return_per_projection: If `True`, also return the estimate of each
            direction.

    Returns:
        The SMI estimate, a Python float in nats; with
        `return_per_projection=True`, a tuple `(smi, per_projection)` where
        `per_projection` is a float array of shape `(num_projections,)`.
    """
    try:
        from sklearn.feature_selection import mutual_info_classif
    except ImportError as error:  # pragma: no cover
        raise ImportError(
            "sliced_mutual_information needs scikit-learn: "
            "`pip install scikit-learn`."
        ) from error

    if not _is_int(num_projections) or num_projections < 1:
        raise ValueError(
            "Received an invalid value for `num_projections`, expected a "
            f"positive integer. Received: num_projections={num_projections!r}"
        )
    if not _is_int(n_neighbors) or n_neighbors < 1:
        raise ValueError(
            "Received an invalid value for `n_neighbors`, expected a "
            f"positive integer. Received: n_neighbors={n_neighbors!r}"
        )
    features = np.asarray(_to_numpy(features), dtype=np.float64)
    if features.ndim == 0:
        raise ValueError(
            "Expected `features` of shape (num_examples, ...). "
            f"Received: features.shape={features.shape}"
        )
    features = features.reshape(features.shape[0], -1)
    num_examples, num_features = features.shape
    if num_features == 0:
        raise ValueError(
            "`features` has no feature axis to project. "
            f"Received: features.shape={features.shape}"
        )
    if num_examples <= n_neighbors:
        raise ValueError(
            f"Need more than n_neighbors={n_neighbors} examples to estimate "
            f"mutual information. Received: {num_examples} examples."
        )
    if not np.all(np.isfinite(features)):
        raise ValueError("Received non-finite values in `features`.")
    classes = _class_indices(labels, num_examples)

    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((num_features, num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    projections = features @ directions
    per_projection = mutual_info_classif(
        projections,
        classes,
        discrete_features=False,
        n_neighbors=n_neighbors,
        random_state=int(rng.integers(2**31 - 1)),
    )
    smi = float(np.mean(per_projection))
    if return_per_projection:
        return smi, per_projection
    return smi


def _mask_per_example(statistics_or_mask):
    """The 0/1 selection mask as `(num_examples, units)` floats.

    For inputs with more than two axes (e.g. sequences), the mask of an
    example is averaged over its inner positions.
    """
    if isinstance(statistics_or_mask, GateStatistics):
        mask = statistics_or_mask.mask
    else:
        mask = _to_numpy(statistics_or_mask)
    mask = np.asarray(mask, dtype=np.float64)
    if mask.ndim < 2:
        raise ValueError(
            "Expected a GateStatistics or a mask of shape "
            f"(num_examples, ..., units). Received: mask.shape={mask.shape}"
        )
    return mask.reshape(mask.shape[0], -1, mask.shape[-1]).mean(axis=1)


def _frequency(statistics_or_frequency):
    if isinstance(statistics_or_frequency, GateStatistics):
        return np.asarray(statistics_or_frequency.selection_frequency, float)
    frequency = np.asarray(_to_numpy(statistics_or_frequency), float)
    if frequency.ndim != 1 or np.any((frequency < 0) | (frequency > 1)):
        raise ValueError(
            "Expected a GateStatistics or a selection frequency of shape "
            "(units,) with values in [0, 1]. Received an array of shape "
            f"{frequency.shape} with range "
            f"[{frequency.min(initial=0)}, {frequency.max(initial=0)}]."
        )
    return frequency


def _binary_entropy_bits(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(terms, nan=0.0)


def selection_by_class(statistics_or_mask, labels, num_classes=None):
    """Per-class selection pattern: how often each class selects each neuron.

    ```
    P[c, j] = mean over the examples of class c of m_j
    ```

    the class-by-neuron matrix that `keras_midl.plotting` draws as a heat
    map. Rows of classes absent from `labels` are NaN.

    Example:

    >>> mask = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    >>> keras_midl.analysis.selection_by_class(mask, np.array([0, 0, 1]))
    array([[1. , 0.5, 0.5],
           [0. , 1. , 1. ]])

    Args:
        statistics_or_mask: A `GateStatistics` (from
            `keras_midl.gate_statistics`) or a 0/1 mask of shape
            `(num_examples, ..., units)`.
        labels: Integer class labels `0..num_classes-1`, shape
            `(num_examples,)`, or one-hot.
        num_classes: Number of rows; defaults to `max(labels) + 1`.

    Returns:
        Float array of shape `(num_classes, units)`, values in `[0, 1]`.
    """
    mask = _mask_per_example(statistics_or_mask)
    labels = _to_numpy(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = np.argmax(labels, axis=1)
    labels = labels.reshape(-1)
    if labels.shape[0] != mask.shape[0] or labels.dtype.kind not in "iub":
        raise ValueError(
            "Expected integer `labels` with one entry per example "
            f"({mask.shape[0]}). Received: labels of shape {labels.shape} "
            f"and dtype {labels.dtype}"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(
            "`labels` must be non-negative class indices. "
            f"Received a minimum of {labels.min()}"
        )
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    elif not _is_int(num_classes) or num_classes <= labels.max(initial=-1):
        raise ValueError(
            "`num_classes` must be an integer larger than every label. "
            f"Received: num_classes={num_classes!r}"
        )
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    sums = np.zeros((num_classes, mask.shape[1]))
    np.add.at(sums, labels, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def gate_entropy(statistics_or_frequency):
    """Mean binary entropy of the neurons' selection, in bits.

    ```
    H_gate = mean_j H_b(f_j),   H_b(f) = -f log2 f - (1 - f) log2 (1 - f)
    ```

    with `f_j` the selection frequency of neuron `j`. 0 means a static gate
    (every neuron always or never on the full path: the gate could be
    replaced by a fixed choice of `k` neurons); the maximum, `H_b(k / n)`
    (about 1 bit), means every neuron is selected equally often. It measures
    how input-dependent the selection is, not whether it depends on the
    class: see `class_selection_information` for that.

    Args:
        statistics_or_frequency: A `GateStatistics` or a selection
            frequency array of shape `(units,)`.

    Returns:
        Python float, in bits.
    """
    return float(np.mean(_binary_entropy_bits(_frequency(
        statistics_or_frequency
    ))))


def effective_neurons(statistics_or_frequency):
    """Effective number of neurons the gate uses: `exp(H(u))`.

    `u_j = f_j / sum_i f_i` is the share of all selections that neuron `j`
    receives. The result lies between `k` (the same `k` neurons for every
    input) and `units` (every neuron equally often).

    Args:
        statistics_or_frequency: A `GateStatistics` or a selection
            frequency array of shape `(units,)`.

    Returns:
        Python float.
    """
    frequency = _frequency(statistics_or_frequency)
    total = frequency.sum()
    if total == 0:
        return 0.0
    usage = frequency[frequency > 0] / total
    return float(np.exp(-np.sum(usage * np.log(usage))))


def class_selection_information(statistics_or_mask, labels):
    """How much the selection of a neuron tells about the class, in bits.

    ```
    I_gate = mean_j I(m_j ; Y) = mean_j [ H_b(f_j) - sum_c p(c) H_b(f_j|c) ]
    ```

    the mutual information between the 0/1 selection of each neuron and the
    label, from the empirical frequencies (a plug-in estimate, biased
    upwards by about `(num_classes - 1) / (2 N ln 2)` bits for `N`
    examples), averaged over neurons. 0 means class-independent selection.

    Args:
        statistics_or_mask: A `GateStatistics` or a 0/1 mask of shape
            `(num_examples, ..., units)`.
        labels: Integer class labels, shape `(num_examples,)`, or one-hot.

    Returns:
        Python float, in bits.
    """
    mask = _mask_per_example(statistics_or_mask)
    per_class = selection_by_class(mask, labels)
    labels = _to_numpy(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        labels = np.argmax(labels, axis=1)
    counts = np.bincount(labels.reshape(-1), minlength=per_class.shape[0])
    present = counts > 0
    weights = counts[present] / counts.sum()
    marginal = mask.mean(axis=0)
    conditional = _binary_entropy_bits(per_class[present])
    information = _binary_entropy_bits(marginal) - weights @ conditional
    return float(np.mean(np.maximum(information, 0.0)))


@dataclasses.dataclass(frozen=True)
class GateSummary:
    """A one-line summary of one MIDL gate on a batch.

    Attributes:
        layer_name: Name of the MIDL layer.
        units: Number of neurons `n`.
        active_fraction: `k / n`.
        num_rows: Number of rows (examples, or positions) in the batch.
        num_dead: Neurons never selected on the batch.
        num_always_on: Neurons selected for every row.
        gate_entropy_bits: `gate_entropy`, in bits.
        max_gate_entropy_bits: `H_b(k / n)`, its largest possible value.
        effective_neurons: `effective_neurons`, between `k` and `n`.
        class_information_bits: `class_selection_information`, in bits, or
            `None` when no labels were given.
    """

    layer_name: str
    units: int
    active_fraction: float
    num_rows: int
    num_dead: int
    num_always_on: int
    gate_entropy_bits: float
    max_gate_entropy_bits: float
    effective_neurons: float
    class_information_bits: float | None = None

    def to_dict(self):
        """The summary as a JSON-serializable dict."""
        return dataclasses.asdict(self)


def summarize_gates(statistics, labels=None):
    """Summarizes the output of `keras_midl.gate_statistics`.

    Example:

    >>> layer = keras_midl.MIDL(16, k_ratio=0.25, name="midl")
    >>> x = np.random.default_rng(0).normal(size=(64, 8))
    >>> _ = layer(x)
    >>> stats = keras_midl.gate_statistics(layer, x)
    >>> summary = keras_midl.analysis.summarize_gates(stats)["midl"]
    >>> summary.num_dead <= 16, summary.active_fraction
    (True, 0.25)

    Args:
        statistics: A dict `{layer_name: GateStatistics}` as returned by
            `keras_midl.gate_statistics`, or one `GateStatistics`.
        labels: Optional integer class labels, shape `(num_examples,)`, for
            `class_information_bits`.

    Returns:
        A dict `{layer_name: GateSummary}` (a single `GateSummary` when one
        `GateStatistics` is given).
    """
    if isinstance(statistics, GateStatistics):
        return summarize_gates({statistics.layer_name: statistics}, labels)[
            statistics.layer_name
        ]
    if not isinstance(statistics, dict) or not all(
        isinstance(value, GateStatistics) for value in statistics.values()
    ):
        raise ValueError(
            "Expected the dict returned by `gate_statistics` or a "
            f"GateStatistics. Received: statistics={statistics!r}"
        )
    summaries = {}
    for name, stats in statistics.items():
        frequency = np.asarray(stats.selection_frequency, dtype=np.float64)
        information = None
        if labels is not None:
            information = class_selection_information(stats, labels)
        summaries[name] = GateSummary(
            layer_name=name,
            units=int(frequency.shape[0]),
            active_fraction=float(stats.active_fraction),
            num_rows=int(stats.mask.size // frequency.shape[0]),
            num_dead=int(stats.dead_neurons.size),
            num_always_on=int(stats.always_on_neurons.size),
            gate_entropy_bits=gate_entropy(frequency),
            max_gate_entropy_bits=float(
                _binary_entropy_bits(stats.active_fraction)
            ),
            effective_neurons=effective_neurons(frequency),
            class_information_bits=information,
        )
    return summaries
