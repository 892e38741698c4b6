"""Search MIDL's k_ratio with KerasTuner, trading accuracy against FLOPs.

Each trial trains the MLP 64-128-10 on scikit-learn's bundled digits (no
download) with one k_ratio of the grid 0.2, 0.4, ..., 1.0 and scores it
`val_accuracy - lam * flops_fraction`. Needs `pip install
"keras-midl[jax,tuner,examples]"` (or another backend):

    KERAS_BACKEND=jax python examples/tune_k_ratio.py --lam 0.1

KerasTuner's trial files go to `--output` (default: a `keras_midl_results`
folder in the system's temporary folder). The MNIST benchmark with plots is
the repository's benchmarks/tune_k_ratio.py.
"""

import argparse
import os
import tempfile

try:
    import keras_tuner
    from sklearn.datasets import load_digits
except ImportError as error:
    raise SystemExit(
        f'{error.name} is missing: pip install "keras-midl[tuner,examples]"'
    ) from error
import keras

import keras_midl
import keras_midl.tuning


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--output",
        default=os.path.join(tempfile.gettempdir(), "keras_midl_results"),
        help="Folder for KerasTuner's trial files (default: %(default)s).",
    )
    return parser.parse_args(argv)


def build():  # An ordinary model: MIDLHyperModel searches its k_ratio.
    model = keras.Sequential([
        keras.Input((64,)),
        keras_midl.MIDL(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(
        "adam", "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    return model


class PrintTrial(keras.callbacks.Callback):
    """Prints one line per trial: its k_ratio and last-epoch logs."""

    def on_epoch_end(self, epoch, logs=None):
        self.logs = dict(logs)

    def on_train_end(self, logs=None):
        (midl,) = [
            layer
            for layer in self.model.layers
            if isinstance(layer, keras_midl.MIDL)
        ]
        print(
            f"k_ratio {midl.k_ratio:.1f}: val_accuracy "
            f"{self.logs['val_accuracy']:.3f}, FLOPs fraction "
            f"{self.logs['flops_fraction']:.3f}, objective "
            f"{self.logs['val_efficiency']:.3f}",
            flush=True,
        )


def main(argv=None):
    args = parse_args(argv)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    x_train, y_train, x_val, y_val = x[:1400], y[:1400], x[1400:], y[1400:]

    hypermodel = keras_midl.tuning.MIDLHyperModel(
        build,
        lam=args.lam,
        search_space={"k_ratio": (0.2, 1.0), "k_ratio_step": 0.2},
    )
    tuner = keras_tuner.GridSearch(
        hypermodel,
        objective=hypermodel.objective,
        overwrite=True,
        directory=args.output,
        project_name="tune_k_ratio_example",
    )
    tuner.search(
        x_train,
        y_train,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        callbacks=[PrintTrial()],
        verbose=0,
    )
    best = tuner.get_best_hyperparameters()[0]
    print(f"best k_ratio: {best.get('k_ratio')} (lam {args.lam})")


if __name__ == "__main__":
    main()
