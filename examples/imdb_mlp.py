"""IMDB sentiment: embedding + average pooling + an MLP with MIDL layers.

    KERAS_BACKEND=jax python -m examples.imdb_mlp --data-dir ../shared/datasets

Reviews are tokenized with keras.layers.TextVectorization (adapted on the
training reviews), then Embedding -> GlobalAveragePooling1D -> 256 -> 128.

Run from the repository root (it imports `benchmarks.datasets`); without
`--data-dir` the data comes from TensorFlow Datasets: `pip install -c
requirements/constraints.txt -r requirements/benchmarks.txt`.
Tokenizing needs TensorFlow on every backend (`TextVectorization`): `pip
install "keras-midl[tensorflow]"`.
"""

import argparse

try:
    import tensorflow  # noqa: F401  (keras.layers.TextVectorization)
except ImportError as error:
    raise SystemExit(
        "examples/imdb_mlp.py tokenizes with keras.layers.TextVectorization, "
        'which needs TensorFlow: pip install "keras-midl[tensorflow]"'
    ) from error
import keras

from benchmarks import datasets
from benchmarks import models
from keras_midl import flops

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--data-dir", default=None)
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--k-ratio", type=float, default=0.45)
parser.add_argument("--vocabulary-size", type=int, default=20000)
parser.add_argument("--sequence-length", type=int, default=200)
parser.add_argument("--variant", choices=models.VARIANTS, default="midl")
args = parser.parse_args()

data = datasets.load(
    "imdb",
    data_dir=args.data_dir,
    vocabulary_size=args.vocabulary_size,
    sequence_length=args.sequence_length,
)
model = models.text_mlp(
    args.sequence_length,
    args.vocabulary_size,
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
