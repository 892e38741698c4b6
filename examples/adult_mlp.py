"""UCI Adult (income > 50K): a 105-256-128-2 MLP with MIDL hidden layers.

    KERAS_BACKEND=jax python examples/adult_mlp.py --data-dir ../shared/datasets

`--data-dir DIR` (or KERAS_MIDL_DATA_DIR) reads the unmodified UCI files
`DIR/adult/adult.data` and `DIR/adult/adult.test` (or the same names with
`.gz`); without it, the two files are downloaded from UCI once (into
`~/.keras/datasets/adult`) and checked by MD5. `--variant baseline` uses
Dense layers; `--max-examples 2000` trains and tests on a random subset.

The 6 numeric columns are standardized with the training split's mean and
standard deviation, the 8 categorical ones one-hot encoded with the
training split's categories (a missing `?` or unseen value: all zeros).
"""

import argparse
import gzip
import os

import keras
import numpy as np

from keras_midl import MIDL
from keras_midl import flops

URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/"
MD5 = {  # of the uncompressed files, as published by UCI
    "adult.data": "5d7c39d7b8804f071cdd1f2a7c460872",
    "adult.test": "35238206dfdf7f1fe215bbb874adecdc",
}
# age, fnlwgt, education-num, capital-gain, capital-loss, hours-per-week
NUMERIC = [0, 2, 4, 10, 11, 12]
CATEGORICAL = [1, 3, 5, 6, 7, 8, 9, 13]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("KERAS_MIDL_DATA_DIR")
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--variant", choices=["baseline", "midl"],
                        default="midl")
    parser.add_argument("--max-examples", type=int, default=None)
    return parser.parse_args(argv)


def adult_files(data_dir=None):
    """Paths of adult.data and adult.test: local, else downloaded."""
    if data_dir:
        folder = os.path.join(data_dir, "adult")
        paths = []
        for name in MD5:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                path += ".gz"
            if not os.path.exists(path):
                raise SystemExit(f"Missing {os.path.join(folder, name)}[.gz]")
            paths.append(path)
        return paths
    try:
        return [
            keras.utils.get_file(
                name, URL + name, file_hash=md5, cache_subdir="adult"
            )
            for name, md5 in MD5.items()
        ]
    except Exception as error:
        raise SystemExit(
            f"Could not download the UCI Adult files from {URL} ({error}). "
            "Download adult.data and adult.test yourself and pass "
            "--data-dir DIR with them in DIR/adult/."
        ) from error


def read_rows(path):
    """String fields `(rows, 14)` and labels (1 for `>50K`) of one file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as file:
        # adult.test starts with "|1x3 Cross validator"; its labels end
        # with a dot ("<=50K.").
        rows = [
            [field.strip() for field in line.split(",")]
            for line in file
            if line.strip() and not line.startswith("|")
        ]
    fields = np.array([row[:-1] for row in rows])
    labels = np.array([row[-1].rstrip(".") == ">50K" for row in rows])
    return fields, labels.astype("int32")


def encode(train, test):
    """Standardized numbers, then one-hot categories, as float32."""
    numbers = train[:, NUMERIC].astype("float64")
    mean, std = numbers.mean(axis=0), numbers.std(axis=0)

    def features(fields):
        blocks = [(fields[:, NUMERIC].astype("float64") - mean) / std]
        for column in CATEGORICAL:
            categories = sorted(set(train[:, column]) - {"?"})
            blocks.append(fields[:, [column]] == np.array(categories))
        return np.concatenate(blocks, axis=1).astype("float32")

    return features(train), features(test)


def subset(x, y, size, seed=0):
    """At most `size` random examples of `(x, y)`."""
    index = np.random.default_rng(seed).permutation(len(x))[:size]
    return x[index], y[index]


def build_model(input_dim, variant, k_ratio):
    def hidden(units):
        if variant == "baseline":
            return keras.layers.Dense(units, activation="relu")
        return MIDL(units, k_ratio=k_ratio, activation="relu")

    return keras.Sequential([
        keras.Input((input_dim,)),
        hidden(256),
        hidden(128),
        keras.layers.Dense(2, activation="softmax"),
    ])


def main(argv=None):
    args = parse_args(argv)
    train_path, test_path = adult_files(args.data_dir)
    train_fields, y_train = read_rows(train_path)
    test_fields, y_test = read_rows(test_path)
    x_train, x_test = encode(train_fields, test_fields)
    if args.max_examples:
        x_train, y_train = subset(x_train, y_train, args.max_examples)
        x_test, y_test = subset(x_test, y_test, args.max_examples)
    model = build_model(x_train.shape[1], args.variant, args.k_ratio)
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
