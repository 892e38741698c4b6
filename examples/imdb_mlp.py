"""IMDB sentiment: embedding + average pooling + an MLP with MIDL layers.

    KERAS_BACKEND=jax python examples/imdb_mlp.py --data-dir ../shared/datasets

Reviews are tokenized with keras.layers.TextVectorization (adapted on the
training reviews), then Embedding -> GlobalAveragePooling1D -> 256 -> 128.

`--data-dir DIR` (or KERAS_MIDL_DATA_DIR) reads `DIR/imdb/
imdb_reviews.jsonl.gz`: one JSON object per line with `split` ("train" or
"test"), `label` (0 negative, 1 positive) and `text`. Without it,
TensorFlow Datasets downloads `imdb_reviews` (`pip install
tensorflow-datasets`). Tokenizing needs TensorFlow on every backend
(`TextVectorization`): `pip install "keras-midl[tensorflow]"`.
`--max-examples 2000` trains and tests on a random subset (a quick check).
"""

import argparse
import gzip
import json
import os

try:
    import tensorflow  # noqa: F401  (keras.layers.TextVectorization)
except ImportError as error:
    raise SystemExit(
        "examples/imdb_mlp.py tokenizes with keras.layers.TextVectorization, "
        'which needs TensorFlow: pip install "keras-midl[tensorflow]"'
    ) from error
import keras
import numpy as np

from keras_midl import MIDL
from keras_midl import flops


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", default=os.environ.get("KERAS_MIDL_DATA_DIR")
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--k-ratio", type=float, default=0.45)
    parser.add_argument("--vocabulary-size", type=int, default=20000)
    parser.add_argument("--sequence-length", type=int, default=200)
    parser.add_argument("--variant", choices=["baseline", "midl"],
                        default="midl")
    parser.add_argument("--max-examples", type=int, default=None)
    return parser.parse_args(argv)


def load_reviews(data_dir=None):
    """`{"train": (texts, labels), "test": (texts, labels)}`."""
    splits = {"train": ([], []), "test": ([], [])}
    if data_dir:
        path = os.path.join(data_dir, "imdb", "imdb_reviews.jsonl.gz")
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                review = json.loads(line)
                if review["split"] not in splits:  # e.g. unlabelled reviews
                    continue
                texts, labels = splits[review["split"]]
                texts.append(review["text"])
                labels.append(review["label"])
    else:
        import tensorflow_datasets as tfds

        for split, (texts, labels) in splits.items():
            data = tfds.load("imdb_reviews", split=split, as_supervised=True)
            for x, y in tfds.as_numpy(data.batch(4096)):
                texts.extend(text.decode("utf-8") for text in x)
                labels.extend(y)
    return {
        split: ([text.replace("<br />", " ") for text in texts],
                np.array(labels, dtype="int32"))
        for split, (texts, labels) in splits.items()
    }


def subset(texts, labels, size, seed=0):
    """At most `size` random reviews."""
    index = np.random.default_rng(seed).permutation(len(texts))[:size]
    return [texts[i] for i in index], labels[index]


def build_model(sequence_length, vocabulary_size, variant, k_ratio):
    def hidden(units):
        if variant == "baseline":
            return keras.layers.Dense(units, activation="relu")
        return MIDL(units, k_ratio=k_ratio, activation="relu")

    return keras.Sequential([
        keras.Input((sequence_length,), dtype="int32"),
        keras.layers.Embedding(vocabulary_size, 128, mask_zero=True),
        keras.layers.GlobalAveragePooling1D(),
        hidden(256),
        hidden(128),
        keras.layers.Dense(2, activation="softmax"),
    ])


def main(argv=None):
    args = parse_args(argv)
    splits = load_reviews(args.data_dir)
    if args.max_examples:
        splits = {
            split: subset(texts, labels, args.max_examples)
            for split, (texts, labels) in splits.items()
        }
    train_texts, y_train = splits["train"]
    test_texts, y_test = splits["test"]
    # Token ids: 0 is padding, 1 out-of-vocabulary.
    vectorizer = keras.layers.TextVectorization(
        max_tokens=args.vocabulary_size,
        output_sequence_length=args.sequence_length,
    )
    vectorizer.adapt(train_texts, batch_size=1024)

    def vectorize(texts):
        return np.concatenate([
            keras.ops.convert_to_numpy(vectorizer(texts[i : i + 2048]))
            for i in range(0, len(texts), 2048)
        ]).astype("int32")

    x_train, x_test = vectorize(train_texts), vectorize(test_texts)
    model = build_model(
        args.sequence_length, args.vocabulary_size, args.variant,
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
