"""Robustness of MIDL against Dense (same width and same cost) and Dense +
Dropout(0.5).

The paper claims MID-L is more robust "under overfitting and noisy data".
Three experiments on MLPs of the same size, several seeds each:

1. Label noise: a fraction of the training labels (0, 20, 40% by default)
   is replaced by a different class drawn uniformly (symmetric noise);
   accuracy on the clean test set after training, and accuracy on the
   noisy training labels (how much noise the model memorized).
2. Input noise at test time: Gaussian noise of standard deviation sigma
   added to the (0-1 scaled) test pixels, no clipping, for the models
   trained on clean labels.
3. Small data: 1,000 training examples trained for many epochs: train
   accuracy, test accuracy and their gap.

Models (hidden sizes 512-256 by default, ReLU, softmax classifier):
`dense` (Dense layers), `iso_cost` (Dense layers narrowed to the MIDL
model's inference multiply-adds, `iso_cost_hidden`: a user's real
alternative to MIDL), `dropout` (Dense + Dropout(0.5) after each hidden
layer) and `midl` (MIDL layers with the library defaults, k_ratio 0.5).
The gates of the clean-label MIDL models are summarized with
`keras_midl.analysis.summarize_gates`, and drawn for the first seed.

The gate statistics use `--gate-examples` test examples drawn per class in
proportion (`benchmarks.datasets.stratified_indices`, the same subset for
every seed): the first rows of a test split can hold a few classes only
(the CIFAR-10 test split of the shared subset is sorted by class).

To fit a busy CPU, each model kind is compiled once and re-initialized for
every run (fresh weights from the run's seed, optimizer state restored).

Usage (from the repository root):

    KERAS_BACKEND=jax python -m benchmarks.robustness
    KERAS_BACKEND=jax python -m benchmarks.robustness --dataset cifar10

Writes `<output>/robustness[_<dataset>].{json,md}` and
`<output>/robustness_<dataset>_gates_<layer>.png`; `--output` defaults to a
folder outside the repository (pass `--output benchmarks/results/robustness`
to update the committed results).
"""

import argparse
import os
import tempfile

import keras
import numpy as np

from benchmarks import common  # noqa: E402
from benchmarks import datasets  # noqa: E402
from keras_midl import MIDL  # noqa: E402
from keras_midl import flops  # noqa: E402
from keras_midl import gate_statistics  # noqa: E402
from keras_midl.analysis import summarize_gates  # noqa: E402
from keras_midl.plotting import save_gate_plots  # noqa: E402

MODEL_KINDS = ("dense", "iso_cost", "dropout", "midl")
# MIDL ranks of the hidden layers in the committed runs (the library's
# default rank rule was clip(min(d, n) // 16, 4, 32) then; it is now a 10%
# cost budget, which would give 22 and 12 here).
MIDL_RANKS = (32, 16)
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_results")
GATE_SUBSET_SEED = 2024
DEFAULT_DATA_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
    "datasets",
)


def iso_cost_hidden(input_dim, num_classes, hidden_units):
    """Hidden widths of the `iso_cost` MLP: `hidden_units` scaled by one
    factor to the inference multiply-adds of the `midl` MLP (gate, light
    path and output layer included; `keras_midl.flops.iso_cost_units`)."""
    midl = build_mlp("midl", input_dim, num_classes, hidden_units)
    return flops.iso_cost_units(
        input_dim,
        hidden_units,
        flops.model_multiply_adds(midl),
        output_units=num_classes,
    )


def build_mlp(kind, input_dim, num_classes, hidden_units):
    """The MLP of one kind: `dense`, `iso_cost`, `dropout` or `midl`."""
    if kind == "iso_cost":
        hidden_units = iso_cost_hidden(input_dim, num_classes, hidden_units)
    layers = [keras.Input((input_dim,))]
    for index, units in enumerate(hidden_units):
        name = f"hidden_{index}"
        if kind == "midl":
            layers.append(
                MIDL(
                    units,
                    rank=MIDL_RANKS[index],
                    activation="relu",
                    name=name,
                )
            )
        else:
            layers.append(
                keras.layers.Dense(units, activation="relu", name=name)
            )
            if kind == "dropout":
                layers.append(keras.layers.Dropout(0.5))
    layers.append(keras.layers.Dense(num_classes, activation="softmax"))
    return keras.Sequential(layers, name=kind)


class Runner:
    """One compiled model per kind, re-initialized for every run.

    Compiling a model costs more than training it on this machine (about
    a minute for MIDL under JAX on a busy CPU); reusing the compiled
    training step across runs keeps the benchmark short. Each run starts
    from the weights of a freshly built model seeded with the run's seed,
    and from the optimizer's initial state.
    """

    def __init__(self, kind, input_dim, num_classes, hidden_units, lr):
        self.kind = kind
        self.arguments = (kind, input_dim, num_classes, hidden_units)
        self.model = build_mlp(*self.arguments)
        self.model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
        )
        self.model.optimizer.build(self.model.trainable_variables)
        self.initial_optimizer = [
            keras.ops.convert_to_numpy(variable)
            for variable in self.model.optimizer.variables
        ]

    def reset(self, seed):
        keras.utils.set_random_seed(seed)
        fresh = build_mlp(*self.arguments)
        self.model.set_weights(fresh.get_weights())
        for variable, value in zip(
            self.model.optimizer.variables, self.initial_optimizer
        ):
            variable.assign(value)

    def fit(self, x, y, epochs, batch_size, seed):
        self.reset(seed)
        self.model.fit(
            x, y, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0
        )

    def accuracy(self, x, y, batch_size):
        probabilities = self.model.predict(x, batch_size=batch_size, verbose=0)
        return float(np.mean(np.argmax(probabilities, axis=-1) == y))


def symmetric_label_noise(labels, rate, num_classes, rng):
    """Replaces `round(rate * n)` labels by a different, uniform class."""
    labels = labels.copy()
    count = int(round(rate * len(labels)))
    flipped = rng.choice(len(labels), size=count, replace=False)
    offsets = rng.integers(1, num_classes, size=count)
    labels[flipped] = (labels[flipped] + offsets) % num_classes
    return labels


def midl_gate_statistics(model, x):
    """Gate statistics of every MIDL layer, running the layers eagerly.

    Eager calls avoid compiling a probe model (`gate_statistics(model, x)`
    does that), which costs more than the whole evaluation here.
    """
    statistics = {}
    hidden = keras.ops.convert_to_tensor(x)
    for layer in model.layers:
        if isinstance(layer, MIDL):
            statistics.update(gate_statistics(layer, hidden))
        hidden = layer(hidden, training=False)
    return statistics


def gate_subset(y, size):
    """Indices of the gate-statistics examples: stratified by class."""
    return datasets.stratified_indices(
        y, min(size, len(y)), seed=GATE_SUBSET_SEED
    )


def subset(x, y, size, rng):
    if size is None or size >= len(x):
        return x, y
    index = rng.choice(len(x), size=size, replace=False)
    return x[index], y[index]


def aggregate(records, keys):
    """Mean and std over seeds of every metric, grouped by `keys`."""
    groups = {}
    for record in records:
        group = tuple(record[key] for key in keys)
        groups.setdefault(group, []).append(record)
    rows = []
    for group, members in groups.items():
        row = dict(zip(keys, group))
        row["seeds"] = len(members)
        metrics = [
            name
            for name, value in members[0].items()
            if name not in keys and name != "seed"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ]
        for metric in metrics:
            mean, std = common.mean_std([m[metric] for m in members])
            row[f"{metric}_mean"] = mean
            row[f"{metric}_std"] = std
        rows.append(row)
    return rows


def pm(metric, scale=100.0, digits=1):
    def cell(row):
        mean = row.get(f"{metric}_mean")
        if mean is None:
            return "—"
        std = row[f"{metric}_std"]
        return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"

    return cell


def load_average():
    """The 1-minute load average, or `None` where it cannot be read."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def main(argv=None):
    load_before = load_average()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist",
                        choices=("mnist", "cifar10"))
    parser.add_argument("--data-dir", default=None,
                        help="local dataset folder (default: ../shared/"
                        "datasets when present, else KERAS_MIDL_DATA_DIR "
                        "or TFDS)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--train-size", type=int, default=10000,
                        help="training examples for the label-noise runs")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--label-noise", type=float, nargs="+",
                        default=[0.0, 0.2, 0.4])
    parser.add_argument("--sigmas", type=float, nargs="+",
                        default=[0.0, 0.1, 0.2, 0.3, 0.5, 0.8])
    parser.add_argument("--small-size", type=int, default=1000)
    parser.add_argument("--small-epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gate-examples", type=int, default=2000,
                        help="test examples for the gate statistics, drawn "
                        "per class in proportion")
    parser.add_argument("--output", default=DEFAULT_OUTPUT,
                        help="folder for the result files (default: "
                        f"{DEFAULT_OUTPUT}; the committed results are in "
                        "benchmarks/results/robustness)")
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)

    def output_path(name):
        return os.path.join(args.output, name)

    data_dir = args.data_dir
    if data_dir is None and os.path.isdir(DEFAULT_DATA_DIR):
        data_dir = os.path.abspath(DEFAULT_DATA_DIR)
    data = datasets.load(args.dataset, data_dir=data_dir)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    y_train, y_test = data.y_train, data.y_test
    input_dim, num_classes = x_train.shape[1], data.num_classes
    eval_batch = 1000
    seeds = list(range(args.seeds))
    suffix = "" if args.dataset == "mnist" else f"_{args.dataset}"

    runners = {
        kind: Runner(kind, input_dim, num_classes, tuple(args.hidden), args.lr)
        for kind in MODEL_KINDS
    }
    # Inference multiply-adds per example of each model (whether or not
    # it runs: `MODEL_KINDS` may be narrowed).
    midl_cost, dense_cost, iso_cost = (
        flops.model_multiply_adds(
            build_mlp(kind, input_dim, num_classes, tuple(args.hidden))
        )
        for kind in ("midl", "dense", "iso_cost")
    )
    iso_hidden = "-".join(
        str(u)
        for u in iso_cost_hidden(input_dim, num_classes, tuple(args.hidden))
    )
    total = len(seeds) * len(MODEL_KINDS) * (len(args.label_noise) + 1)
    progress = common.Progress(total, label=f"robustness {args.dataset}")

    gate_index = gate_subset(y_test, args.gate_examples)
    gate_x, gate_y = x_test[gate_index], y_test[gate_index]
    label_noise_records, input_noise_records = [], []
    small_records, gate_records = [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x_sub, y_sub = subset(x_train, y_train, args.train_size, rng)
        for rate in args.label_noise:
            noisy = symmetric_label_noise(y_sub, rate, num_classes, rng)
            for kind, runner in runners.items():
                runner.fit(x_sub, noisy, args.epochs, args.batch_size, seed)
                test = runner.accuracy(x_test, y_test, eval_batch)
                record = {
                    "model": kind,
                    "label_noise": rate,
                    "seed": seed,
                    "test_accuracy": test,
                    "train_accuracy_noisy_labels": runner.accuracy(
                        x_sub, noisy, eval_batch
                    ),
                    "train_accuracy_true_labels": runner.accuracy(
                        x_sub, y_sub, eval_batch
                    ),
                }
                label_noise_records.append(record)
                if rate == 0.0:
                    noise_rng = np.random.default_rng(1000 + seed)
                    for sigma in args.sigmas:
                        noisy_x = x_test + sigma * noise_rng.standard_normal(
                            x_test.shape
                        ).astype(x_test.dtype)
                        input_noise_records.append({
                            "model": kind,
                            "sigma": sigma,
                            "seed": seed,
                            "test_accuracy": runner.accuracy(
                                noisy_x, y_test, eval_batch
                            ),
                        })
                    if kind == "midl":
                        stats = midl_gate_statistics(runner.model, gate_x)
                        summaries = summarize_gates(stats, gate_y)
                        for summary in summaries.values():
                            gate_records.append(
                                {"seed": seed, **summary.to_dict()}
                            )
                        if seed == seeds[0]:
                            for name, layer_stats in stats.items():
                                save_gate_plots(
                                    layer_stats,
                                    output_path(
                                        f"robustness_{args.dataset}_gates_"
                                        f"{name}.png"
                                    ),
                                    labels=gate_y,
                                )
                progress.step(
                    f"seed {seed} label_noise {rate:.0%} {kind}",
                    f"test {test:.4f}",
                )
        x_small, y_small = subset(x_train, y_train, args.small_size, rng)
        for kind, runner in runners.items():
            runner.fit(x_small, y_small, args.small_epochs, args.batch_size,
                       seed)
            train = runner.accuracy(x_small, y_small, eval_batch)
            test = runner.accuracy(x_test, y_test, eval_batch)
            small_records.append({
                "model": kind,
                "seed": seed,
                "train_accuracy": train,
                "test_accuracy": test,
                "gap": train - test,
            })
            progress.step(f"seed {seed} small-data {kind}",
                          f"train {train:.4f} test {test:.4f}")

    metadata = common.environment()
    settings = {key: value for key, value in vars(args).items()}
    settings["data_source"] = data.source
    settings["iso_cost_hidden"] = iso_hidden
    settings["multiply_adds"] = {
        "dense": dense_cost, "iso_cost": iso_cost, "midl": midl_cost,
    }
    settings["load_average_before"] = load_before
    settings["load_average_after"] = load_average()
    settings["gate_subset"] = (
        f"{len(gate_index)} test examples, stratified by class "
        f"(benchmarks.datasets.stratified_indices, seed {GATE_SUBSET_SEED})"
    )
    settings["gate_class_counts"] = np.bincount(
        gate_y, minlength=num_classes
    ).tolist()
    label_rows = aggregate(label_noise_records, ("label_noise", "model"))
    input_rows = aggregate(input_noise_records, ("sigma", "model"))
    small_rows = aggregate(small_records, ("model",))
    common.write_json(
        output_path(f"robustness{suffix}.json"),
        label_rows,
        metadata,
        settings=settings,
        input_noise=input_rows,
        small_data=small_rows,
        gates=gate_records,
        per_seed={
            "label_noise": label_noise_records,
            "input_noise": input_noise_records,
            "small_data": small_records,
        },
    )

    label_table = common.markdown_table(label_rows, [
        ("label_noise", "Label noise", ".0%"),
        ("model", "Model", None),
        (pm("test_accuracy"), "Clean test acc. (%)", None),
        (pm("train_accuracy_noisy_labels"), "Train acc. on noisy labels (%)",
         None),
    ])
    sigma_values = sorted({row["sigma"] for row in input_rows})
    input_cells = []
    for kind in MODEL_KINDS:
        cells = {"model": kind}
        for row in input_rows:
            if row["model"] == kind:
                cells[row["sigma"]] = pm("test_accuracy")(row)
        input_cells.append(cells)
    input_table = common.markdown_table(
        input_cells,
        [("model", "Model", None)]
        + [(sigma, f"σ = {sigma:g}", None) for sigma in sigma_values],
    )
    small_table = common.markdown_table(small_rows, [
        ("model", "Model", None),
        (pm("train_accuracy"), "Train acc. (%)", None),
        (pm("test_accuracy"), "Test acc. (%)", None),
        (pm("gap"), "Gap (points)", None),
    ])
    gate_rows = aggregate(gate_records, ("layer_name",))
    gate_table = common.markdown_table(gate_rows, [
        ("layer_name", "MIDL layer", None),
        (lambda r: f"{r['units_mean']:.0f}", "Units", None),
        (pm("num_dead", 1, 1), "Dead", None),
        (pm("num_always_on", 1, 1), "Always on", None),
        (pm("effective_neurons", 1, 1), "Effective neurons", None),
        (pm("gate_entropy_bits", 1, 3), "Gate entropy (bits)", None),
        (lambda r: f"{r['max_gate_entropy_bits_mean']:.3f}", "Max", None),
        (pm("class_information_bits", 1, 3), "I(selection; class) (bits)",
         None),
    ]) if gate_rows else "(no MIDL gates)"

    hidden = "-".join(str(u) for u in args.hidden)
    body = "\n".join([
        f"# Robustness on {args.dataset}: Dense (same width, same cost) vs "
        "Dense + Dropout(0.5) vs MIDL\n",
        f"MLP {input_dim}-{hidden}-{num_classes}, Adam lr {args.lr}, batch "
        f"{args.batch_size}; mean ± std over {len(seeds)} seeds. MIDL: "
        "library defaults (k_ratio 0.5), ranks "
        f"{', '.join(str(r) for r in MIDL_RANKS[: len(args.hidden)])}; "
        f"{midl_cost:,} inference multiply-adds per example against "
        f"{dense_cost:,} for `dense`. `iso_cost`: Dense of hidden widths "
        f"{iso_hidden}, {iso_cost:,} multiply-adds (the MIDL model's cost, "
        "gate and light path included).\n",
        f"## Symmetric label noise ({args.train_size} training examples, "
        f"{args.epochs} epochs)\n",
        label_table + "\n",
        "## Gaussian input noise at test time (models trained on clean "
        "labels; test accuracy, %)\n",
        input_table + "\n",
        f"## Small data ({args.small_size} training examples, "
        f"{args.small_epochs} epochs)\n",
        small_table + "\n",
        f"## MIDL gates (clean-label models, {len(gate_index)} test "
        "examples, stratified by class)\n",
        gate_table + "\n",
        common.metadata_markdown(metadata) + "  \n"
        f"Load average (1 min): {load_before} before, "
        f"{settings['load_average_after']} after.\n",
    ])
    with open(output_path(f"robustness{suffix}.md"), "w") as file:
        file.write(body)
    print(body)


if __name__ == "__main__":
    main()
