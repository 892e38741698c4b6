"""Find the most accurate MIDL MLP within a Dense MLP's inference cost.

Trains the Dense MLP 64-128-10 on scikit-learn's bundled digits (no
download), takes its cost with `keras_midl.flops.model_multiply_adds`, and
searches MIDL models with wider hidden layers (128 times 1, 1.5, 2 or 3)
and a `k_ratio` of 0.1, 0.2, ..., 1.0, among the configurations that cost
no more: `keras_midl.tuning.budgeted_hyperparameters` declares only those,
so no trial is spent on a model over budget. The search is for accuracy
alone (`lam=0`). Prints one line per trial, then the Dense model's test
accuracy and cost next to the best MIDL's. Needs `pip install
"keras-midl[jax,tuner,examples]"` (or another backend):

    KERAS_BACKEND=jax python examples/tune_within_budget.py --max-trials 6

KerasTuner's trial files go to `--output` (default: a `keras_midl_results`
folder in the system's temporary folder).
"""

import argparse
import os
import tempfile
import warnings

try:
    import keras_tuner
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as error:
    raise SystemExit(
        f'{error.name} is missing: pip install "keras-midl[tuner,examples]"'
    ) from error
import keras

import keras_midl
import keras_midl.flops
import keras_midl.tuning

INPUT_DIM, HIDDEN, CLASSES = 64, [128], 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output",
        default=os.path.join(tempfile.gettempdir(), "keras_midl_results"),
        help="Folder for KerasTuner's trial files (default: %(default)s).",
    )
    return parser.parse_args(argv)


def compiled(layers):
    model = keras.Sequential(
        [
            keras.Input((INPUT_DIM,)),
            *layers,
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )
    model.compile(
        "adam", "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


def make_build(budget):
    def build(hp):  # Declares only (widths, k_ratio) within the budget.
        config = keras_midl.tuning.budgeted_hyperparameters(
            hp,
            INPUT_DIM,
            HIDDEN,
            budget,
            width_multipliers=(1.0, 1.5, 2.0, 3.0),
            k_ratio=(0.1, 1.0),
            k_ratio_step=0.1,
            output_units=CLASSES,  # the output layer's cost grows with width
        )
        units = config.pop("units")
        return compiled(
            [keras_midl.MIDL(n, activation="relu", **config) for n in units]
        )

    return build


def describe(model):
    """`64-256-10, k_ratio 0.3` for a model of MIDL hidden layers."""
    midl = [
        layer for layer in model.layers if isinstance(layer, keras_midl.MIDL)
    ]
    widths = "-".join(str(layer.units) for layer in midl)
    return f"{INPUT_DIM}-{widths}-{CLASSES}, k_ratio {midl[0].k_ratio:g}"


class PrintTrial(keras.callbacks.Callback):
    """Prints one line per trial: its model, cost and best val_accuracy."""

    def on_train_begin(self, logs=None):
        self.best = 0.0

    def on_epoch_end(self, epoch, logs=None):
        self.best = max(self.best, logs["val_accuracy"])

    def on_train_end(self, logs=None):
        cost = keras_midl.flops.model_multiply_adds(self.model)
        print(
            f"trial: MIDL {describe(self.model)}: {cost:,} multiply-adds, "
            f"val_accuracy {self.best:.3f}",
            flush=True,
        )


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=args.seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_train,
        y_train,
        test_size=0.2,
        random_state=args.seed,
        stratify=y_train,
    )
    fit_args = {"epochs": args.epochs, "batch_size": 32, "verbose": 0}

    dense = compiled([keras.layers.Dense(n, activation="relu") for n in HIDDEN])
    dense.fit(x_train, y_train, validation_data=(x_val, y_val), **fit_args)
    budget = keras_midl.flops.model_multiply_adds(dense)
    dense_accuracy = dense.evaluate(x_test, y_test, verbose=0)[1]

    build = make_build(budget)
    space = keras_tuner.HyperParameters()
    build(space)
    configurations = sum(len(p.values) for p in space.space[1:])
    print(
        f"Budget: {budget:,} multiply-adds (the Dense MLP); {configurations} "
        f"MIDL configurations within it; {args.max_trials} trials of "
        f"{args.epochs} epochs",
        flush=True,
    )
    hypermodel = keras_midl.tuning.MIDLHyperModel(build, lam=0, budget=budget)
    tuner = keras_tuner.RandomSearch(
        hypermodel,
        objective=hypermodel.objective,
        max_trials=args.max_trials,
        seed=args.seed,
        overwrite=True,
        directory=args.output,
        project_name="tune_within_budget_example",
    )
    tuner.search(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        callbacks=[PrintTrial()],
        **fit_args,
    )
    with warnings.catch_warnings():  # the checkpoint's optimizer state
        warnings.filterwarnings("ignore", "Skipping variable loading")
        (best,) = tuner.get_best_models(1)
    best_cost = keras_midl.flops.model_multiply_adds(best)
    best_accuracy = best.evaluate(x_test, y_test, verbose=0)[1]

    widths = "-".join(map(str, HIDDEN))
    print(
        f"\nDense {INPUT_DIM}-{widths}-{CLASSES}: test accuracy "
        f"{dense_accuracy:.3f}, {budget:,} multiply-adds"
    )
    print(
        f"best MIDL {describe(best)}: test accuracy {best_accuracy:.3f}, "
        f"{best_cost:,} multiply-adds ({best_cost / budget:.2f}x the Dense)"
    )
    print(f"best hyperparameters: {tuner.get_best_hyperparameters()[0].values}")


if __name__ == "__main__":
    main()
