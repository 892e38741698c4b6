"""MNIST: a 784-512-256-10 MLP whose hidden layers are MIDL layers.

    KERAS_BACKEND=jax python examples/mnist_mlp.py --data-dir ../shared/datasets

`--data-dir DIR` (or the KERAS_MIDL_DATA_DIR environment variable) reads
`DIR/mnist/mnist.npz` (the arrays `x_train`, `y_train`, `x_test`, `y_test`
of `keras.datasets.mnist`); without it, `keras.datasets.mnist` downloads
the data. `--variant baseline` trains the same model with Dense layers;
`--max-examples 2000` trains and tests on a random subset (a quick check).
"""

import argparse
import os

import keras
import numpy as np

from keras_midl import MIDL
from keras_midl import flops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("KERAS_MIDL_DATA_DIR")
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--variant", choices=["baseline", "midl"],
                        default="midl")
    parser.add_argument("--max-examples", type=int, default=None)
    return parser.parse_args(argv)


def load_mnist(data_dir=None):
    """`(x_train, y_train), (x_test, y_test)`, pixels scaled to [0, 1]."""
    if data_dir:
        with np.load(os.path.join(data_dir, "mnist", "mnist.npz")) as data:
            splits = [
                (data["x_train"], data["y_train"]),
                (data["x_test"], data["y_test"]),
            ]
    else:
        splits = keras.datasets.mnist.load_data()
    return [(x.astype("float32") / 255, y.astype("int32")) for x, y in splits]


def subset(x, y, size, seed=0):
    """At most `size` random examples of `(x, y)`."""
    index = np.random.default_rng(seed).permutation(len(x))[:size]
    return x[index], y[index]


def build_model(variant, k_ratio):
    def hidden(units):
        if variant == "baseline":
            return keras.layers.Dense(units, activation="relu")
        return MIDL(units, k_ratio=k_ratio, activation="relu")

    return keras.Sequential([
        keras.Input((28, 28)),
        keras.layers.Flatten(),
        hidden(512),
        hidden(256),
        keras.layers.Dense(10, activation="softmax"),
    ])


def main(argv=None):
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test) = load_mnist(args.data_dir)
    if args.max_examples:
        x_train, y_train = subset(x_train, y_train, args.max_examples)
        x_test, y_test = subset(x_test, y_test, args.max_examples)
    model = build_model(args.variant, args.k_ratio)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, batch_size=128, epochs=args.epochs)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy: {accuracy:.4f}")
    flops.summary(model)


if __name__ == "__main__":
    main()
