"""UCI Adult (income > 50K): a 105-256-128-2 MLP with MIDL hidden layers.

    KERAS_BACKEND=jax python -m examples.adult_mlp --data-dir ../shared/datasets

Without `--data-dir` (or KERAS_MIDL_DATA_DIR) the two UCI files are
downloaded once and checked by MD5. `--variant baseline` uses Dense layers.

Run from the repository root (it imports `benchmarks.datasets`).
"""

import argparse

import keras

from benchmarks import datasets
from benchmarks import models
from keras_midl import flops

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", default=None)
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--k-ratio", type=float, default=0.45)
parser.add_argument("--variant", choices=models.VARIANTS, default="midl")
args = parser.parse_args()

# One-hot categories and standardized numbers (training-split statistics).
data = datasets.load("adult", data_dir=args.data_dir)
model = models.mlp(
    data.x_train.shape[1:],
    data.num_classes,
    variant=args.variant,
    hidden_units=(256, 128),
    k_ratio=args.k_ratio,
)
model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
model.fit(data.x_train, data.y_train, batch_size=128, epochs=args.epochs)
_, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0)
print(f"test accuracy: {accuracy:.4f}")
flops.summary(model)
