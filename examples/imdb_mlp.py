"""IMDB sentiment: embedding + average pooling + an MLP with MIDL layers.

    KERAS_BACKEND=jax python examples/imdb_mlp.py --data-dir ../shared/datasets

Reviews are tokenized with keras.layers.TextVectorization (adapted on the
training reviews), then Embedding -> GlobalAveragePooling1D -> 256 -> 128.
"""

import argparse

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
