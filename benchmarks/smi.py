"""Sliced Mutual Information of hidden representations: Dense vs MIDL.

The paper claims that MID-L's selected neurons are "more informative", by
Sliced Mutual Information (SMI) with the labels. This script trains a Dense
MLP and a MIDL MLP of the same size, and a Dense MLP narrowed to the MIDL
MLP's inference cost (`iso_cost`, as in `benchmarks/robustness.py`), then
estimates, on held-out test examples, the SMI with the class of each
hidden layer's representation (`keras_midl.analysis.
sliced_mutual_information`, nats):

* `dense`: all outputs of the Dense layer;
* `dense_top_k`: the Dense layer's outputs with all but the `k` largest
  of each row set to 0 (a post-hoc top-k with MIDL's `k`: the selection
  without a learned gate);
* `iso_cost`: all outputs of the narrower Dense layer of the same cost;
* `midl`: all outputs of the MIDL layer;
* `midl_selected`: MIDL's outputs on the `k` gate-selected neurons only
  (the others set to 0);
* `midl_unselected`: MIDL's outputs on the other `n - k` neurons only;
* `midl_random_k`: MIDL's outputs on `k` neurons drawn at random per row
  (the control for `midl_selected`: same count, no gate).

plus the raw input pixels as a reference, and `H(Y)`, the upper bound.

Usage (from the repository root):

    KERAS_BACKEND=jax python -m benchmarks.smi

The SMI is estimated on `--examples` test examples stratified by class (the
subset `benchmarks.robustness` uses for gate statistics: CIFAR-10's test
split is sorted by class, so its first rows hold a few classes only).
Writes `smi.json` and `smi.md` to `--output` (default: a folder outside
the repository; `--output benchmarks/results/smi` updates the committed
results).
"""

import argparse
import os

import keras
import numpy as np

from benchmarks import common  # noqa: E402
from benchmarks import datasets  # noqa: E402
from benchmarks import robustness  # noqa: E402
from keras_midl import MIDL  # noqa: E402
from keras_midl import gate_statistics  # noqa: E402
from keras_midl.analysis import label_entropy  # noqa: E402
from keras_midl.analysis import sliced_mutual_information  # noqa: E402

REPRESENTATIONS = (
    "dense",
    "dense_top_k",
    "iso_cost",
    "midl",
    "midl_selected",
    "midl_unselected",
    "midl_random_k",
)


def hidden_outputs(model, x):
    """Outputs (NumPy) and MIDL masks of the hidden layers, run eagerly."""
    outputs, masks = [], []
    hidden = keras.ops.convert_to_tensor(x)
    for layer in model.layers[:-1]:
        if isinstance(layer, MIDL):
            stats = gate_statistics(layer, hidden)[layer.name]
            masks.append(stats.mask)
        hidden = layer(hidden, training=False)
        if not isinstance(layer, keras.layers.Dropout):
            outputs.append(keras.ops.convert_to_numpy(hidden))
    return outputs, masks


def top_k_per_row(values, k):
    """Keeps the `k` largest entries of each row, zeros the others."""
    keep = np.argpartition(-values, k - 1, axis=1)[:, :k]
    result = np.zeros_like(values)
    np.put_along_axis(
        result, keep, np.take_along_axis(values, keep, axis=1), axis=1
    )
    return result


def random_k_mask(shape, k, rng):
    scores = rng.random(shape)
    mask = np.zeros(shape, dtype="float32")
    np.put_along_axis(mask, np.argsort(scores, axis=1)[:, :k], 1.0, axis=1)
    return mask


def model_of(representation):
    """The model (`robustness.MODEL_KINDS`) a representation comes from."""
    if representation == "iso_cost":
        return "iso_cost"
    return "dense" if representation.startswith("dense") else "midl"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist",
                        choices=("mnist", "cifar10"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--examples", type=int, default=2000,
                        help="test examples for the SMI estimate")
    parser.add_argument("--projections", type=int, default=64)
    common.add_output_argument(parser)
    args = parser.parse_args()
    load_before = common.load_average()

    data_dir = args.data_dir
    if data_dir is None and os.path.isdir(robustness.DEFAULT_DATA_DIR):
        data_dir = os.path.abspath(robustness.DEFAULT_DATA_DIR)
    data = datasets.load(args.dataset, data_dir=data_dir)
    x_train = data.x_train.reshape(len(data.x_train), -1)
    x_test = data.x_test.reshape(len(data.x_test), -1)
    input_dim, num_classes = x_train.shape[1], data.num_classes
    subset = robustness.gate_subset(data.y_test, args.examples)
    x_eval = x_test[subset]
    y_eval = data.y_test[subset]
    entropy = label_entropy(y_eval)
    seeds = list(range(args.seeds))
    hidden = tuple(args.hidden)
    runners = {
        kind: robustness.Runner(kind, input_dim, num_classes, hidden, args.lr)
        for kind in ("dense", "iso_cost", "midl")
    }
    iso_hidden = robustness.iso_cost_hidden(input_dim, num_classes, hidden)
    progress = common.Progress(len(seeds) * len(runners), label="smi")

    def smi(features, seed):
        return sliced_mutual_information(
            features, y_eval, num_projections=args.projections, seed=seed
        )

    records = []
    pixels = [smi(x_eval, seed) for seed in seeds]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        x_sub, y_sub = robustness.subset(
            x_train, data.y_train, args.train_size, rng
        )
        layer_outputs, accuracies = {}, {}
        for kind, runner in runners.items():
            runner.fit(x_sub, y_sub, args.epochs, args.batch_size, seed)
            accuracies[kind] = runner.accuracy(x_test, data.y_test, 1000)
            layer_outputs[kind] = hidden_outputs(runner.model, x_eval)
            progress.step(f"seed {seed} {kind} trained",
                          f"test {accuracies[kind]:.4f}")
        dense_outputs, _ = layer_outputs["dense"]
        midl_outputs, midl_masks = layer_outputs["midl"]
        for index in range(len(hidden)):
            mask = midl_masks[index].astype(np.float32)
            k = int(round(mask.sum(axis=1).mean()))
            features = {
                "dense": dense_outputs[index],
                "dense_top_k": top_k_per_row(dense_outputs[index], k),
                "iso_cost": layer_outputs["iso_cost"][0][index],
                "midl": midl_outputs[index],
                "midl_selected": midl_outputs[index] * mask,
                "midl_unselected": midl_outputs[index] * (1 - mask),
                "midl_random_k": midl_outputs[index]
                * random_k_mask(mask.shape, k, rng),
            }
            for name in REPRESENTATIONS:
                values = features[name]
                records.append({
                    "layer": index,
                    "units": values.shape[1],
                    "k": k,
                    "representation": name,
                    "seed": seed,
                    "smi": smi(values, seed),
                    "all_zero_rows": float(
                        np.mean(~np.any(values != 0, axis=1))
                    ),
                    "test_accuracy": accuracies[model_of(name)],
                })
            progress.note(
                f"seed {seed} layer {index}: "
                + ", ".join(
                    f"{r['representation']} {r['smi']:.3f}"
                    for r in records[-len(REPRESENTATIONS):]
                )
            )

    rows = robustness.aggregate(records, ("layer", "representation"))
    pixel_mean, pixel_std = common.mean_std(pixels)
    metadata = common.environment()
    metadata["load_average"] = load_before
    metadata["load_average_after"] = common.load_average()
    settings = dict(vars(args))
    del settings["output"]
    settings["data_source"] = data.source
    settings["iso_cost_hidden"] = list(iso_hidden)
    common.write_json(
        common.output_path(args.output, "smi.json"),
        rows,
        metadata,
        settings=settings,
        label_entropy_nats=entropy,
        input_pixels_smi={"mean": pixel_mean, "std": pixel_std,
                          "per_seed": pixels},
        per_seed=records,
    )
    columns = [
        (lambda r: f"{r['layer']} ({r['units_mean']:.0f} units, "
         f"k = {r['k_mean']:.0f})", "Hidden layer", None),
        ("representation", "Representation", None),
        (robustness.pm("smi", 1, 3), "SMI (nats)", None),
        (lambda r: f"{r['smi_mean'] / entropy:.1%}", "SMI / H(Y)", None),
        (robustness.pm("all_zero_rows", 100, 1), "All-zero rows (%)", None),
        (robustness.pm("test_accuracy"), "Model test acc. (%)", None),
    ]
    notes = [
        f"H(Y) = {entropy:.3f} nats on the {len(y_eval)} test examples "
        "(stratified by class); "
        f"SMI of the raw input pixels: {pixel_mean:.3f} ± {pixel_std:.3f} "
        "nats.",
        f"MLP {input_dim}-{'-'.join(map(str, hidden))}-{num_classes}, "
        f"{args.train_size} training examples, {args.epochs} epochs, "
        f"mean ± std over {len(seeds)} seeds; {args.projections} random "
        "projections, kNN estimator (Ross 2014, scikit-learn, k = 3). "
        f"`iso_cost`: the Dense MLP of hidden widths "
        f"{'-'.join(map(str, iso_hidden))}, the MIDL MLP's inference "
        "multiply-adds (gate and light path included).",
    ]
    markdown_path = common.output_path(args.output, "smi.md")
    common.write_markdown(
        markdown_path,
        rows,
        metadata,
        columns,
        title=f"Sliced Mutual Information with the label ({args.dataset})",
        notes=notes,
    )
    with open(markdown_path) as file:
        print(file.read())


if __name__ == "__main__":
    main()
