"""Loaders for the six MID-L benchmarks, as NumPy arrays for any backend.

`load(name)` returns the train and test splits of `mnist`, `cifar10`,
`cifar100`, `svhn_cropped`, `adult` or `imdb`, preprocessed the way the
benchmarks use them:

* images (`mnist`, `cifar10`, `cifar100`, `svhn_cropped`): float32 pixels
  scaled to `[0, 1]`, shape `(N, H, W, C)` (`C = 1` for MNIST); int32 labels.
  Integer pixels (and float pixels above 1) are divided by 255; float
  pixels already in `[0, 1]` are kept as they are. Labels must be whole
  numbers in `[0, num_classes)`; others (0.7, -1, 300) are an error.
* `adult`: the UCI "Adult" census files. The 6 numeric columns are
  standardized with the training split's mean and standard deviation; the
  8 categorical columns are one-hot encoded with the categories seen in the
  training split. `?` marks a missing value: its one-hot block is all
  zeros (as is a category seen only in the test split). The test file's
  first line (`|1x3 Cross validator`) and its dot-suffixed labels
  (`>50K.`) are handled. Label 1 is `>50K`. float32 features, int32 labels.
* `imdb`: the Large Movie Review Dataset. `<br />` tags become spaces, then
  `keras.layers.TextVectorization` (lower case, punctuation stripped),
  adapted on the training texts only, maps each review to
  `sequence_length` int32 token ids (0 is padding, 1 out-of-vocabulary),
  with a vocabulary of at most `vocabulary_size` tokens. Label 1 is
  positive.

Sources, in this order:

1. a local folder, `data_dir=...` or the `KERAS_MIDL_DATA_DIR` environment
   variable, laid out as:

   ```
   mnist/mnist.npz             x_train, y_train, x_test, y_test (uint8)
   cifar10/<one file>.npz      the same keys
   cifar100/<one file>.npz     the same keys
   svhn_cropped/<one file>.npz the same keys
   adult/adult.data[.gz]       the UCI files, unmodified
   adult/adult.test[.gz]
   imdb/imdb_reviews.jsonl[.gz] one JSON object per line: split, label, text
   ```

2. otherwise TensorFlow Datasets (`tensorflow_datasets`, imported only
   here), which downloads on first use (`tfds_data_dir` chooses its cache);
   `imdb` is TFDS's `imdb_reviews`. TFDS has no Adult: without a local
   folder, `adult` downloads the two UCI files with `keras.utils.get_file`
   and checks their MD5 checksums.

Example:

>>> data = load("mnist", data_dir="../shared/datasets")
>>> data.x_train.shape, data.y_train.shape, data.num_classes
((60000, 28, 28, 1), (60000,), 10)
>>> (x_train, y_train), (x_test, y_test) = data.as_tuples()
"""

import dataclasses
import glob
import gzip
import hashlib
import json
import math
import os
import zipfile
import zlib

import numpy as np

from keras_midl._checks import is_integer

NAMES = ("mnist", "cifar10", "cifar100", "svhn_cropped", "adult", "imdb")
DATA_DIR_VARIABLE = "KERAS_MIDL_DATA_DIR"
SOURCES = ("auto", "local", "tfds")

_NUM_CLASSES = {
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "svhn_cropped": 10,
    "adult": 2,
    "imdb": 2,
}
_TFDS_NAMES = {"imdb": "imdb_reviews"}
_IMAGE_KEYS = ("x_train", "y_train", "x_test", "y_test")

ADULT_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/adult/"
# MD5 of the uncompressed files, as published by UCI.
ADULT_MD5 = {
    "adult.data": "5d7c39d7b8804f071cdd1f2a7c460872",
    "adult.test": "35238206dfdf7f1fe215bbb874adecdc",
}
ADULT_COLUMNS = (
    "age",
    "workclass",
    "fnlwgt",
    "education",
    "education-num",
    "marital-status",
    "occupation",
    "relationship",
    "race",
    "sex",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
    "native-country",
)
ADULT_NUMERIC = (
    "age",
    "fnlwgt",
    "education-num",
    "capital-gain",
    "capital-loss",
    "hours-per-week",
)


@dataclasses.dataclass
class Dataset:
    """Train and test splits as NumPy arrays.

    Attributes:
        name: Benchmark name, e.g. `"mnist"`.
        x_train, y_train, x_test, y_test: NumPy arrays; labels are int32.
        num_classes: Number of classes.
        source: Where the data came from: a local path, `"tfds"` or the
            download cache.
        info: Extra per-dataset facts: `feature_names` for Adult,
            `vocabulary` for IMDB.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    source: str
    info: dict = dataclasses.field(default_factory=dict)

    def as_tuples(self):
        """`(x_train, y_train), (x_test, y_test)`, as `keras.datasets`."""
        return (self.x_train, self.y_train), (self.x_test, self.y_test)


def load(
    name,
    data_dir=None,
    source="auto",
    download=True,
    tfds_data_dir=None,
    vocabulary_size=20000,
    sequence_length=200,
):
    """Loads one benchmark's train and test splits, preprocessed.

    Args:
        name: One of `"mnist"`, `"cifar10"`, `"cifar100"`,
            `"svhn_cropped"`, `"adult"`, `"imdb"`.
        data_dir: Local folder laid out as in the module docstring. `None`
            reads `KERAS_MIDL_DATA_DIR`, and uses TFDS (or, for Adult, the
            UCI download) when that is unset too.
        source: `"auto"` (local folder when one is given, else TFDS),
            `"local"` (fail if no folder) or `"tfds"` (ignore the folder;
            for Adult, the UCI download).
        download: Whether TFDS and the Adult loader may download. With
            `False`, data missing from their caches is an error.
        tfds_data_dir: TFDS cache folder (TFDS's default when `None`); for
            Adult, the download cache folder.
        vocabulary_size: IMDB only: maximum vocabulary size, padding and
            out-of-vocabulary tokens included.
        sequence_length: IMDB only: tokens per review (truncated or padded
            with 0).

    Returns:
        A `Dataset`.

    Raises:
        ValueError: unknown `name` or `source`, invalid IMDB parameters, a
            local file with the wrong layout, a corrupt or truncated file
            (`.npz`, `.gz`) or one that is not UTF-8 text (the message
            names the file), pixels outside `[0, 255]`, or labels that are
            not whole numbers in `[0, num_classes)`.
        FileNotFoundError: a local folder without the expected file.
        ImportError: TFDS needed but `tensorflow_datasets` not installed.
    """
    if name not in NAMES:
        raise ValueError(
            f"Unknown dataset name. Expected one of {NAMES}. "
            f"Received: name={name!r}"
        )
    if source not in SOURCES:
        raise ValueError(
            f"Received an invalid value for `source`, expected one of "
            f"{SOURCES}. Received: source={source!r}"
        )
    if name == "imdb":
        for argument, value in (
            ("vocabulary_size", vocabulary_size),
            ("sequence_length", sequence_length),
        ):
            if not is_integer(value) or (
                value < (3 if argument == "vocabulary_size" else 1)
            ):
                raise ValueError(
                    f"Received an invalid value for `{argument}`, expected "
                    f"a positive integer (vocabulary_size >= 3). "
                    f"Received: {argument}={value!r}"
                )
    if data_dir is None and source != "tfds":
        data_dir = os.environ.get(DATA_DIR_VARIABLE) or None
    if source == "local" and data_dir is None:
        raise ValueError(
            "source='local' needs a folder: pass `data_dir` or set the "
            f"{DATA_DIR_VARIABLE} environment variable."
        )
    use_local = data_dir is not None and source != "tfds"

    if name == "adult":
        if use_local:
            folder = _dataset_folder(data_dir, name)
            paths = {f: _find_file(folder, f) for f in ADULT_MD5}
            where = folder
        else:
            paths = _download_adult(tfds_data_dir, download)
            where = os.path.dirname(paths["adult.data"])
        return _adult(paths, where)
    if name == "imdb":
        if use_local:
            folder = _dataset_folder(data_dir, name)
            path = _find_file(folder, "imdb_reviews.jsonl")
            splits = _read_imdb_jsonl(path)
            where = path
        else:
            splits = _tfds_splits("imdb", tfds_data_dir, download)
            splits = {
                split: ([_decode(text) for text in x], y)
                for split, (x, y) in splits.items()
            }
            where = "tfds"
        return _imdb(splits, where, vocabulary_size, sequence_length)
    if use_local:
        folder = _dataset_folder(data_dir, name)
        path = _find_npz(folder, name)
        splits = _read_image_npz(path, name)
        where = path
    else:
        splits = _tfds_splits(name, tfds_data_dir, download)
        where = "tfds"
    return _images(name, splits, where)


# --- local files ----------------------------------------------------------


def _dataset_folder(data_dir, name):
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Data folder not found: {data_dir!r} (from `data_dir` or "
            f"{DATA_DIR_VARIABLE})."
        )
    folder = os.path.join(data_dir, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"No {name!r} folder in {data_dir!r}: expected {folder!r}. See "
            "the layout in the benchmarks.datasets docstring."
        )
    return folder


def _find_file(folder, filename):
    for candidate in (filename, filename + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Missing file: expected {os.path.join(folder, filename)!r} "
        "(or the same name with .gz)."
    )


def _find_npz(folder, name):
    preferred = os.path.join(folder, f"{name}.npz")
    if os.path.isfile(preferred):
        return preferred
    found = sorted(glob.glob(os.path.join(folder, "*.npz")))
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected {preferred!r} or exactly one .npz file in {folder!r}. "
            f"Found: {[os.path.basename(p) for p in found]}"
        )
    return found[0]


def _open_text(path):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


# What a corrupt, truncated or non-UTF-8 file raises while it is read.
_UNREADABLE = (
    zipfile.BadZipFile,
    EOFError,
    UnicodeDecodeError,
    zlib.error,
    gzip.BadGzipFile,
)


def _unreadable(path, error):
    """The ValueError for a file that cannot be read, naming it."""
    return ValueError(
        f"Cannot read {path!r}: the file is corrupt, truncated or not in "
        f"the expected format (UTF-8 text, gzip or .npz). Replace it with "
        f"a fresh copy. ({type(error).__name__}: {error})"
    )


def _read_image_npz(path, name):
    try:
        with np.load(path) as arrays:
            found = {key: arrays[key] for key in _IMAGE_KEYS if key in arrays}
    except FileNotFoundError:
        raise
    except (*_UNREADABLE, OSError, ValueError) as error:
        # A file without the .npz signature is read as a pickle or .npy
        # file and fails with an OSError or ValueError of NumPy's own.
        raise _unreadable(path, error) from error
    missing = [key for key in _IMAGE_KEYS if key not in found]
    if missing:
        raise ValueError(
            f"{path!r} lacks the arrays {missing}; a {name} .npz file "
            f"needs {list(_IMAGE_KEYS)}."
        )
    return {
        "train": (found["x_train"], found["y_train"]),
        "test": (found["x_test"], found["y_test"]),
    }


def _whole_number_label(value, path, number):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise ValueError(
            f"{path!r}, line {number}: the label must be a whole number. "
            f"Received: label={value!r}"
        )
    return int(value)


def _read_imdb_jsonl(path):
    try:
        return _read_imdb_lines(path)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from error


def _read_imdb_lines(path):
    texts = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                split = record["split"]
                label = record["label"]
                text = record["text"]
            except (ValueError, KeyError, TypeError) as error:
                if isinstance(error, UnicodeDecodeError):
                    raise
                raise ValueError(
                    f"{path!r}, line {number}: expected a JSON object with "
                    f"'split', 'label' and 'text'. ({error})"
                ) from error
            if split not in texts:
                continue  # e.g. an unlabelled "unsup" split.
            label = _whole_number_label(label, path, number)
            if label not in (0, 1):
                raise ValueError(
                    f"{path!r}, line {number}: IMDB labels are 0 (negative) "
                    f"or 1 (positive). Received: label={label!r}"
                )
            texts[split].append(text)
            labels[split].append(label)
    for split in texts:
        if not texts[split]:
            raise ValueError(f"{path!r} has no {split!r} reviews.")
    return {split: (texts[split], labels[split]) for split in texts}


# --- TFDS -----------------------------------------------------------------


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "Loading from TensorFlow Datasets needs `tensorflow_datasets`: "
            "`pip install keras-midl[datasets]`, or pass `data_dir` (or set "
            f"{DATA_DIR_VARIABLE}) to read a local folder."
        ) from error
    return tfds


def _tfds_splits(name, tfds_data_dir, download):
    tfds = _import_tfds()
    splits = {}
    for split in ("train", "test"):
        dataset = tfds.load(
            _TFDS_NAMES.get(name, name),
            split=split,
            as_supervised=True,
            data_dir=tfds_data_dir,
            download=download,
        )
        xs, ys = [], []
        for x, y in tfds.as_numpy(dataset.batch(4096)):
            xs.append(x)
            ys.append(y)
        splits[split] = (np.concatenate(xs), np.concatenate(ys))
    return splits


def _decode(text):
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


# --- subsets ---------------------------------------------------------------


def stratified_indices(labels, size, seed):
    """`size` distinct indices, drawn per class in proportion, shuffled.

    Benchmark splits can be sorted by class (the CIFAR-10 test split of
    the shared subset is): `x[:size]` would then hold the first classes
    only. Each class gets `floor(size * share)` indices, and the remainder
    goes to the classes with the largest fractional parts.

    Example:

    >>> index = stratified_indices(np.repeat(np.arange(10), 500), 2000, 0)
    >>> np.bincount(np.repeat(np.arange(10), 500)[index]).tolist()
    [200, 200, 200, 200, 200, 200, 200, 200, 200, 200]

    Args:
        labels: Integer labels, shape `(N,)`.
        size: Number of indices, `0 < size <= N`.
        seed: Seed of the NumPy generator (the same seed, the same subset).

    Returns:
        Int64 array of `size` distinct indices into `labels`, in random
        order.
    """
    labels = np.asarray(labels).reshape(-1)
    if not is_integer(size) or not 0 < size <= len(labels):
        raise ValueError(
            f"Received an invalid value for `size`, expected an integer in "
            f"[1, {len(labels)}]. Received: size={size!r}"
        )
    rng = np.random.default_rng(seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    shares = counts * size / len(labels)
    quotas = np.floor(shares).astype(int)
    order = np.argsort(-(shares - quotas), kind="stable")
    quotas[order[: size - quotas.sum()]] += 1
    chosen = np.concatenate([
        rng.choice(np.flatnonzero(inverse == c), size=q, replace=False)
        for c, q in enumerate(quotas)
    ])
    rng.shuffle(chosen)
    return chosen


# --- labels and images ----------------------------------------------------


def check_labels(labels, num_classes, what):
    """Class labels as int32, after checking that they are class indices.

    Args:
        labels: Array-like of labels, any shape (flattened).
        num_classes: Number of classes; labels must lie in
            `[0, num_classes)`.
        what: How the labels are named in an error, e.g. `"mnist train"`.

    Returns:
        Int32 array of shape `(N,)`.

    Raises:
        ValueError: non-numeric labels, labels that are not whole numbers
            (0.7, NaN), or labels outside `[0, num_classes)` (-1, 300).
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "biuf":
        raise ValueError(
            f"{what} labels must be numbers. Received: dtype={labels.dtype}"
        )
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise ValueError(
                f"{what} labels must be whole numbers (class indices). "
                f"{int(bad.sum())} are not, e.g. "
                f"{labels[bad][:5].tolist()}"
            )
    if labels.size:
        low, high = labels.min(), labels.max()
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{what} labels must lie in [0, {num_classes - 1}] "
                f"({num_classes} classes). Received labels from {low} to "
                f"{high}."
            )
    return labels.astype("int32")


def _pixel_scale(name, splits):
    """255 for integer pixels (or floats above 1), 1 for floats in [0, 1].

    One scale for both splits, so that train and test always agree.
    """
    scale = 1.0
    for split, (x, _) in splits.items():
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            raise ValueError(
                f"{name} {split} images must be numbers. "
                f"Received: dtype={x.dtype}"
            )
        if not x.size:
            continue
        low, high = x.min(), x.max()
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or (
            high > 255
        ):
            raise ValueError(
                f"{name} {split} pixels must lie in [0, 255] (or [0, 1] as "
                f"floats). Received values from {low} to {high}."
            )
        if x.dtype.kind != "f" or high > 1:
            scale = 255.0
    return scale


def _images(name, splits, where):
    arrays = {}
    scale = _pixel_scale(name, splits)
    for split, (x, y) in splits.items():
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(
                f"{name} {split} images must have shape (N, H, W[, C]). "
                f"Received: shape={x.shape}"
            )
        y = check_labels(y, _NUM_CLASSES[name], f"{name} {split}")
        if len(y) != len(x):
            raise ValueError(
                f"{name} {split}: {len(x)} images but {len(y)} labels."
            )
        x = x.astype("float32")
        arrays[split] = (x / scale if scale != 1.0 else x, y)
    return Dataset(
        name=name,
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=_NUM_CLASSES[name],
        source=where,
    )


# --- Adult ----------------------------------------------------------------


def file_md5(path):
    """MD5 hex digest of a file's contents (of the uncompressed text for
    a `.gz` file). A corrupt or truncated `.gz` file is a ValueError."""
    digest = hashlib.md5()
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from error
    return digest.hexdigest()


def _download_adult(cache_dir, download):
    import keras

    cache_dir = cache_dir or os.path.join(
        os.path.expanduser("~"), ".keras", "datasets"
    )
    folder = os.path.join(cache_dir, "adult")
    paths = {}
    for filename, md5 in ADULT_MD5.items():
        path = os.path.join(folder, filename)
        if not os.path.isfile(path):
            if not download:
                raise FileNotFoundError(
                    f"{path!r} is not cached and download=False. Pass "
                    "`data_dir` for a local copy of the UCI Adult files."
                )
            path = keras.utils.get_file(
                filename,
                origin=ADULT_URL + filename,
                cache_dir=cache_dir,
                cache_subdir="adult",
            )
        actual = file_md5(path)
        if actual != md5:
            raise ValueError(
                f"Checksum mismatch for {path!r}: MD5 {actual}, expected "
                f"{md5} (the UCI file). Delete it to download it again."
            )
        paths[filename] = path
    return paths


def _read_adult_rows(path):
    try:
        return _read_adult_lines(path)
    except _UNREADABLE as error:
        raise _unreadable(path, error) from error


def _read_adult_lines(path):
    rows, labels = [], []
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line or line.startswith("|"):
                continue
            fields = [field.strip() for field in line.split(",")]
            if len(fields) != len(ADULT_COLUMNS) + 1:
                raise ValueError(
                    f"{path!r}, line {number}: expected "
                    f"{len(ADULT_COLUMNS) + 1} comma-separated fields (the "
                    f"UCI Adult layout), got {len(fields)}."
                )
            label = fields[-1].rstrip(".")
            if label not in ("<=50K", ">50K"):
                raise ValueError(
                    f"{path!r}, line {number}: unknown label {fields[-1]!r}; "
                    "expected '<=50K' or '>50K' (optionally with a dot)."
                )
            rows.append(fields[:-1])
            labels.append(1 if label == ">50K" else 0)
    if not rows:
        raise ValueError(f"{path!r} contains no data rows.")
    return rows, np.asarray(labels, dtype="int32")


def _adult(paths, where):
    train_rows, y_train = _read_adult_rows(paths["adult.data"])
    test_rows, y_test = _read_adult_rows(paths["adult.test"])
    numeric = [ADULT_COLUMNS.index(c) for c in ADULT_NUMERIC]
    categorical = [
        i for i, c in enumerate(ADULT_COLUMNS) if c not in ADULT_NUMERIC
    ]

    def numbers(rows, path):
        try:
            return np.asarray(
                [[float(row[i]) for i in numeric] for row in rows],
                dtype="float64",
            )
        except ValueError as error:
            raise ValueError(
                f"{path!r}: a numeric Adult column holds a non-number. "
                f"({error})"
            ) from error

    train_numeric = numbers(train_rows, paths["adult.data"])
    test_numeric = numbers(test_rows, paths["adult.test"])
    mean = train_numeric.mean(axis=0)
    std = train_numeric.std(axis=0)
    std[std == 0] = 1.0

    feature_names = list(ADULT_NUMERIC)
    vocabularies = []
    for i in categorical:
        values = sorted({row[i] for row in train_rows} - {"?"})
        vocabularies.append({value: j for j, value in enumerate(values)})
        feature_names += [f"{ADULT_COLUMNS[i]}={value}" for value in values]

    def encode(rows, numeric_values):
        blocks = [(numeric_values - mean) / std]
        for i, vocabulary in zip(categorical, vocabularies, strict=True):
            block = np.zeros((len(rows), len(vocabulary)))
            for r, row in enumerate(rows):
                j = vocabulary.get(row[i])
                if j is not None:  # "?" and unseen categories stay zero.
                    block[r, j] = 1.0
            blocks.append(block)
        return np.concatenate(blocks, axis=1).astype("float32")

    return Dataset(
        name="adult",
        x_train=encode(train_rows, train_numeric),
        y_train=y_train,
        x_test=encode(test_rows, test_numeric),
        y_test=y_test,
        num_classes=2,
        source=where,
        info={"feature_names": feature_names},
    )


# --- IMDB -----------------------------------------------------------------


def _imdb(splits, where, vocabulary_size, sequence_length):
    import keras

    def clean(texts):
        return [_decode(text).replace("<br />", " ") for text in texts]

    train_texts = clean(splits["train"][0])
    test_texts = clean(splits["test"][0])
    vectorizer = keras.layers.TextVectorization(
        max_tokens=vocabulary_size,
        output_mode="int",
        output_sequence_length=sequence_length,
    )
    vectorizer.adapt(train_texts, batch_size=1024)

    def vectorize(texts):
        parts = [
            np.asarray(
                keras.ops.convert_to_numpy(vectorizer(texts[i : i + 2048]))
            )
            for i in range(0, len(texts), 2048)
        ]
        return np.concatenate(parts).astype("int32")

    return Dataset(
        name="imdb",
        x_train=vectorize(train_texts),
        y_train=check_labels(splits["train"][1], 2, "imdb train"),
        x_test=vectorize(test_texts),
        y_test=check_labels(splits["test"][1], 2, "imdb test"),
        num_classes=2,
        source=where,
        info={"vocabulary": [str(t) for t in vectorizer.get_vocabulary()]},
    )
