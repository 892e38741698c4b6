"""CIFAR-10: a small CNN whose dense head is a MIDL layer.

    KERAS_BACKEND=jax python examples/cifar10_cnn.py \\
        --data-dir ../shared/datasets

Only the dense head (Flatten -> 256 -> 10) uses MIDL; the convolutions are
the same in both variants (`--variant baseline` uses Dense). The same script
works for `--dataset cifar100` and `--dataset svhn_cropped`.

`--data-dir DIR` (or KERAS_MIDL_DATA_DIR) reads the one `.npz` file in
`DIR/<dataset>/` (arrays `x_train`, `y_train`, `x_test`, `y_test`, uint8
images); without it, `keras.datasets` downloads CIFAR-10 and CIFAR-100, and
TensorFlow Datasets (`pip install tensorflow-datasets`) SVHN.
`--max-examples 2000` trains and tests on a random subset (a quick check).
"""

import argparse
import glob
import os

import keras
import numpy as np

from keras_midl import MIDL
from keras_midl import flops

NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("KERAS_MIDL_DATA_DIR")
    )
    parser.add_argument("--dataset", default="cifar10",
                        choices=list(NUM_CLASSES))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--variant", choices=["baseline", "midl"],
                        default="midl")
    parser.add_argument("--max-examples", type=int, default=None)
    return parser.parse_args(argv)


def load_images(name, data_dir=None):
    """`(x_train, y_train), (x_test, y_test)`, pixels scaled to [0, 1]."""
    if data_dir:
        folder = os.path.join(data_dir, name)
        paths = glob.glob(os.path.join(folder, "*.npz"))
        if len(paths) != 1:
            raise SystemExit(f"Expected one .npz file in {folder}: {paths}")
        with np.load(paths[0]) as data:
            splits = [
                (data["x_train"], data["y_train"]),
                (data["x_test"], data["y_test"]),
            ]
    elif name == "svhn_cropped":
        import tensorflow_datasets as tfds

        splits = []
        for split in ("train", "test"):
            data = tfds.load(name, split=split, as_supervised=True)
            batches = tfds.as_numpy(data.batch(4096))  # (x, y) pairs
            splits.append([np.concatenate(part) for part in zip(*batches)])
    else:
        splits = getattr(keras.datasets, name).load_data()
    return [
        (x.astype("float32") / 255, y.reshape(-1).astype("int32"))
        for x, y in splits
    ]


def subset(x, y, size, seed=0):
    """At most `size` random examples of `(x, y)`."""
    index = np.random.default_rng(seed).permutation(len(x))[:size]
    return x[index], y[index]


def build_model(input_shape, num_classes, variant, k_ratio):
    if variant == "baseline":
        head = keras.layers.Dense(256, activation="relu")
    else:
        head = MIDL(256, k_ratio=k_ratio, activation="relu")
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        head,
        keras.layers.Dense(num_classes, activation="softmax"),
    ])


def main(argv=None):
    args = parse_args(argv)
    (x_train, y_train), (x_test, y_test) = load_images(
        args.dataset, args.data_dir
    )
    if args.max_examples:
        x_train, y_train = subset(x_train, y_train, args.max_examples)
        x_test, y_test = subset(x_test, y_test, args.max_examples)
    model = build_model(
        x_train.shape[1:], NUM_CLASSES[args.dataset], args.variant,
        args.k_ratio,
    )
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
