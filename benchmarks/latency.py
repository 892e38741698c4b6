"""Inference latency and memory of MIDL against Dense, and training cost.

Per backend (one child process each, `KERAS_BACKEND` being fixed per
process), for square layers `d = n` in {1024, 4096}, `k_ratio` in
{0.25, 0.45, 0.75} and batch in {1, 32, 256}:

* median latency of one forward pass of `Dense(n)`, of `MIDL(n)` with
  `inference_path="masked"` and with `inference_path="gathered"` (same
  weights), all interleaved in one run after warm-up; ratios to Dense.
  The gathered path materializes `batch * k * d` weights; it is skipped
  (reported as `null`) where that exceeds `--gathered-max-mib`;
* peak memory of one forward pass (in a separate child process, since it
  needs its own allocator settings): the rise of the process's peak
  resident memory (`VmHWM`) over its resident memory before the pass, with
  glibc returning every freed buffer of 64 KiB or more to the system;
* the training-step time ratio MIDL/Dense of an MLP 784-1024-1024-10
  (`k_ratio=0.45`, both hidden layers) at batch 256 (`train_on_batch`).

Forward passes are compiled as Keras compiles `predict` by default on a
CPU-only machine: `tf.function` without XLA on TensorFlow, `jax.jit` (XLA)
on JAX, eager on PyTorch (under `torch.no_grad()`). Each backend runs with
`--threads` threads (default 1, see benchmarks/selection.py).

Usage:

    python benchmarks/latency.py                     # every backend
    python benchmarks/latency.py --backends jax --repeats 3
    python benchmarks/latency.py --dims 256 --batches 1 8 --repeats 2  # smoke

Writes `benchmarks/results/latency.json`, `latency.md` and `latency.png`.
"""

import argparse
import gc
import json
import os

import numpy as np

from benchmarks import common  # noqa: E402
from benchmarks.selection import BACKENDS  # noqa: E402
from benchmarks.selection import block  # noqa: E402
from benchmarks.selection import interleaved_medians  # noqa: E402
from benchmarks.selection import run_backends  # noqa: E402
from benchmarks.selection import set_threads  # noqa: E402

DIMS = (1024, 4096)
K_RATIOS = (0.25, 0.45, 0.75)
BATCHES = (1, 32, 256)
MEMORY_K_RATIO = 0.45
MEMORY_BATCHES = (1, 256)
TRAIN_K_RATIO = 0.45


def forward_function(layer):
    """A compiled inference function `x -> layer(x, training=False)`."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def stateless(trainable, non_trainable, x):
            outputs, _ = layer.stateless_call(
                trainable, non_trainable, x, training=False
            )
            return outputs

        compiled = jax.jit(stateless)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        return lambda x: compiled(trainable, non_trainable, x)
    if backend == "tensorflow":
        import tensorflow as tf

        # Keras's default on a CPU-only machine: a graph, without XLA.
        return tf.function(lambda x: layer(x, training=False))
    if backend == "torch":
        import torch

        def eager(x):
            with torch.no_grad():
                return layer(x, training=False)

        return eager
    raise NotImplementedError(backend)


def gathered_mib(batch, k, d):
    """Size of the gathered weights, `batch * k * d` float32, in MiB."""
    return batch * k * d * 4 / 2**20


def make_layers(d, k_ratio, input_shape):
    """MIDL masked and MIDL gathered, with the same weights."""
    from keras_midl import MIDL

    masked = MIDL(d, k_ratio=k_ratio, inference_path="masked")
    gathered = MIDL(d, k_ratio=k_ratio, inference_path="gathered")
    masked.build(input_shape)
    gathered.build(input_shape)
    gathered.set_weights(masked.get_weights())
    return masked, gathered


def latency_rows(d, batch, repeats, max_mib):
    import keras
    from keras import ops

    rng = np.random.default_rng(0)
    x = ops.convert_to_tensor(rng.normal(size=(batch, d)), "float32")
    dense = keras.layers.Dense(d)
    dense.build((batch, d))
    candidates = {"dense": forward_function(dense)}
    layers = {}
    for k_ratio in K_RATIOS:
        masked, gathered = make_layers(d, k_ratio, (batch, d))
        layers[k_ratio] = masked
        candidates[f"masked {k_ratio}"] = forward_function(masked)
        if gathered_mib(batch, masked.k, d) <= max_mib:
            candidates[f"gathered {k_ratio}"] = forward_function(gathered)
    medians = interleaved_medians(
        {name: (lambda f=f: f(x)) for name, f in candidates.items()},
        warmup=2,
        repeats=repeats,
    )
    rows = []
    for k_ratio, layer in layers.items():
        gathered = medians.get(f"gathered {k_ratio}")
        dense_s = medians["dense"]
        masked_s = medians[f"masked {k_ratio}"]
        rows.append(
            {
                "kind": "latency",
                "backend": keras.backend.backend(),
                "d": d,
                "k_ratio": k_ratio,
                "k": layer.k,
                "rank": layer.effective_rank,
                "batch": batch,
                "dense_ms": dense_s * 1e3,
                "masked_ms": masked_s * 1e3,
                "gathered_ms": None if gathered is None else gathered * 1e3,
                "masked_over_dense": masked_s / dense_s,
                "gathered_over_dense": (
                    None if gathered is None else gathered / dense_s
                ),
                "dense_over_gathered": (
                    None if gathered is None else dense_s / gathered
                ),
                "flops_ratio": d * d / layer.inference_multiply_adds(d),
            }
        )
    return rows


def mlp(layer_factory):
    import keras

    return keras.Sequential(
        [
            keras.Input((784,)),
            layer_factory(1024),
            layer_factory(1024),
            keras.layers.Dense(10),
        ]
    )


def training_row(repeats):
    import keras

    from keras_midl import MIDL

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 784)).astype("float32")
    y = rng.integers(0, 10, size=(256,))
    models = {
        "dense": mlp(lambda n: keras.layers.Dense(n, activation="relu")),
        "midl": mlp(
            lambda n: MIDL(n, k_ratio=TRAIN_K_RATIO, activation="relu")
        ),
    }
    for model in models.values():
        model.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    medians = interleaved_medians(
        {
            name: (lambda model=model: model.train_on_batch(x, y))
            for name, model in models.items()
        },
        warmup=3,
        repeats=repeats,
    )
    midl_layer = models["midl"].layers[0]
    return {
        "kind": "train_step",
        "backend": keras.backend.backend(),
        "model": "MLP 784-1024-1024-10",
        "k_ratio": TRAIN_K_RATIO,
        "batch": 256,
        "selection": midl_layer.selection_method,
        "jit_compile": models["midl"].jit_compile,
        "dense_step_ms": medians["dense"] * 1e3,
        "midl_step_ms": medians["midl"] * 1e3,
        "train_step_ratio": medians["midl"] / medians["dense"],
    }


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_forward_mib(function, x):
    """Rise of the peak resident memory during one (warm) forward pass."""
    block(function(x))
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current VmRSS
    outputs = block(function(x))
    peak = _status_kib("VmHWM")
    del outputs
    return max(0, peak - before) / 1024


def memory_rows(max_mib, dims):
    import keras
    from keras import ops

    rows = []
    rng = np.random.default_rng(0)
    for d in dims:
        for batch in MEMORY_BATCHES:
            x = ops.convert_to_tensor(rng.normal(size=(batch, d)), "float32")
            dense = keras.layers.Dense(d)
            dense.build((batch, d))
            masked, gathered = make_layers(d, MEMORY_K_RATIO, (batch, d))
            fits = gathered_mib(batch, masked.k, d) <= max_mib
            peaks = {
                "dense": peak_forward_mib(forward_function(dense), x),
                "masked": peak_forward_mib(forward_function(masked), x),
                "gathered": (
                    peak_forward_mib(forward_function(gathered), x)
                    if fits
                    else None
                ),
            }
            rows.append(
                {
                    "kind": "memory",
                    "backend": keras.backend.backend(),
                    "d": d,
                    "k_ratio": MEMORY_K_RATIO,
                    "batch": batch,
                    "dense_peak_mib": peaks["dense"],
                    "masked_peak_mib": peaks["masked"],
                    "gathered_peak_mib": peaks["gathered"],
                    "weights_mib": d * d * 4 / 2**20,
                }
            )
            print(rows[-1], flush=True)
    return rows


def child(path, repeats, max_mib, memory, dims, batches):
    set_threads()
    if memory:
        rows = memory_rows(max_mib, dims)
    else:
        rows = []
        for d in dims:
            for batch in batches:
                rows.extend(latency_rows(d, batch, repeats, max_mib))
                print(rows[-1], flush=True)
        rows.append(training_row(repeats))
        print(rows[-1], flush=True)
    metadata = common.environment()
    metadata["threads"] = os.environ.get("OMP_NUM_THREADS")
    with open(path, "w") as file:
        json.dump({"metadata": metadata, "rows": rows}, file)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({row["backend"] for row in rows})
    dims = sorted({row["d"] for row in rows})
    batches = sorted({row["batch"] for row in rows})
    figure, axes = plt.subplots(
        len(dims),
        len(backends),
        figsize=(4 * len(backends), 3.2 * len(dims)),
        squeeze=False,
    )
    for column, backend in enumerate(backends):
        for line, d in enumerate(dims):
            axis = axes[line][column]
            for k_ratio, color in zip(K_RATIOS, ("C0", "C1", "C2")):
                selected = [
                    row
                    for row in rows
                    if row["backend"] == backend
                    and row["d"] == d
                    and row["k_ratio"] == k_ratio
                ]
                batches = [row["batch"] for row in selected]
                axis.plot(
                    batches,
                    [row["masked_over_dense"] for row in selected],
                    "o-",
                    color=color,
                    label=f"masked, k_ratio {k_ratio}",
                )
                gathered = [
                    (row["batch"], row["gathered_over_dense"])
                    for row in selected
                    if row["gathered_over_dense"] is not None
                ]
                if gathered:
                    axis.plot(
                        *zip(*gathered),
                        "s--",
                        color=color,
                        label=f"gathered, k_ratio {k_ratio}",
                    )
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_xscale("log")
            axis.set_yscale("log")
            axis.set_xticks(batches, [str(b) for b in batches])
            axis.set_title(f"{backend}, d = n = {d}")
            axis.set_xlabel("batch")
            if column == 0:
                axis.set_ylabel("latency / Dense latency (log)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def write_results(outputs, memory_outputs):
    rows = [row for output in outputs.values() for row in output["rows"]]
    for output in memory_outputs.values():
        rows += output["rows"]
    metadata = next(iter(outputs.values()))["metadata"]
    metadata["command"] = common.command_line()
    metadata["backend"] = ", ".join(outputs)
    common.write_json(common.results_path("latency.json"), rows, metadata)
    latency = [row for row in rows if row["kind"] == "latency"]
    memory = [row for row in rows if row["kind"] == "memory"]
    training = [row for row in rows if row["kind"] == "train_step"]
    path = common.results_path("latency.md")
    common.write_markdown(
        path,
        latency,
        metadata,
        title="Inference latency of one layer, d = n (median, ms)",
        columns=[
            ("backend", "Backend", None),
            ("d", "d = n", None),
            ("k_ratio", "k_ratio", None),
            ("batch", "Batch", None),
            ("dense_ms", "Dense", ".2f"),
            ("masked_ms", "Masked", ".2f"),
            ("gathered_ms", "Gathered", ".2f"),
            ("masked_over_dense", "Masked / Dense", ".2f"),
            ("dense_over_gathered", "Speed-up gathered", ".2f"),
            ("flops_ratio", "FLOPs speed-up", ".2f"),
        ],
        notes=(
            "Gathered: `null` (—) where the gathered weights, "
            "batch * k * d floats, would exceed the memory cap. "
            "FLOPs speed-up: Dense multiply-adds / MIDL inference "
            "multiply-adds (gate and light path included)."
        ),
    )
    with open(path, "a") as file:
        file.write(
            "\n## Peak memory of one forward pass (MiB above the resident "
            f"memory before it), k_ratio {MEMORY_K_RATIO}\n\n"
            + common.markdown_table(
                memory,
                [
                    ("backend", "Backend", None),
                    ("d", "d = n", None),
                    ("batch", "Batch", None),
                    ("weights_mib", "Weights W (MiB)", ".1f"),
                    ("dense_peak_mib", "Dense", ".1f"),
                    ("masked_peak_mib", "Masked", ".1f"),
                    ("gathered_peak_mib", "Gathered", ".1f"),
                ],
            )
            + "\n\n## Training step, MLP 784-1024-1024-10, batch 256\n\n"
            + common.markdown_table(
                training,
                [
                    ("backend", "Backend", None),
                    ("selection", "Selection", None),
                    ("jit_compile", "XLA", None),
                    ("dense_step_ms", "Dense step (ms)", ".1f"),
                    ("midl_step_ms", "MIDL step (ms)", ".1f"),
                    ("train_step_ratio", "MIDL / Dense", ".2f"),
                ],
            )
            + "\n\n![latency ratios](latency.png)\n"
        )
    plot(latency, common.results_path("latency.png"))
    print(open(path).read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gathered-max-mib", type=float, default=256.0)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument(
        "--batches", type=int, nargs="+", default=list(BATCHES)
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(
            args.child,
            args.repeats,
            args.gathered_max_mib,
            args.memory,
            args.dims,
            args.batches,
        )
        return
    script = os.path.abspath(__file__)
    settings = [
        "--repeats",
        str(args.repeats),
        "--gathered-max-mib",
        str(args.gathered_max_mib),
        "--dims",
        *map(str, args.dims),
        "--batches",
        *map(str, args.batches),
    ]
    outputs = run_backends(script, args.backends, settings, args.threads)
    # Freed buffers of 64 KiB or more go back to the system at once, so the
    # peak resident memory of a pass is not hidden by the allocator's cache.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    memory_outputs = run_backends(
        script, args.backends, [*settings, "--memory"], args.threads
    )
    write_results(outputs, memory_outputs)


if __name__ == "__main__":
    main()
