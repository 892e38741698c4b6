"""Inference latency of one MIDL layer against Dense, and of an MLP.

Per backend (one child process each, `KERAS_BACKEND` being fixed per
process), for square layers `d = n` in {1024, 2048, 4096, 8192}, batch in
{1, 2, 4, 8, 16, 256} and `k_ratio` in {0.25, 0.45, 0.75}:

* median latency of one forward pass of `keras.layers.Dense(n)`, of the
  two raw dense matmuls (`x @ W`, Dense's layout, and `(W^T x^T)^T`, the
  layout MIDL stores its kernel in; the faster is "best dense"), of
  `MIDL(n)` with `inference_path="masked"` and with
  `inference_path="gathered"` (the backend's fast path,
  `keras_midl.fast_inference`), same weights; all interleaved in one round
  robin after warm-up, `--repeats` rounds. `"auto"` runs one of the two
  MIDL paths (`keras_midl.fast_inference.use_gathered_path`); its time is
  that path's, reported with the path it picks;
* the analytic ceiling of the speed-up, `n*d / (k*d + r*(d + 2n))`;
* end to end: a `Sequential` MLP 4096-4096-4096-10 (two hidden layers,
  ReLU) with MIDL (`inference_path="auto"`) against the same MLP with
  Dense, at batch 1, called as `model(x)` and `model.predict_on_batch(x)`.

Forward passes run as Keras runs `predict` on a CPU-only machine:
`tf.function` without XLA on TensorFlow, `jax.jit` on JAX, eager on
PyTorch under `torch.no_grad()`. The gathered MIDL layers' functions are
traced inside `keras_midl.fast_inference.native_allowed()` (the
benchmark's functions are never exported), so on TensorFlow and JAX their
native kernel runs there, as it does in Keras's `predict` and in a
layer's eager calls. The end-to-end rows measure `model(x)` and
`predict_on_batch` as a user calls them.
`--threads 1` (default) limits each backend to one thread; `--threads 0`
leaves the backends' default threading.

The 1-minute load average is read before and after each group of
measurements (one `d` and batch); a group is flagged not valid when either
reading exceeds `1 + threads` (the benchmark's own threads count in the
load average; a reading above that means another job ran).
Compilation (the native kernel once, about 1 s; `jax.jit`, `tf.function`)
happens during the warm-up, before any timing: with `--wait-for FILE` each child
compiles everything, creates `FILE.ready`, and starts timing only once
`FILE` exists (so that a quiet window need not include compilation), and
creates `FILE.done` when its timings are over.

Usage:

    python -m benchmarks.latency                       # every backend
    python -m benchmarks.latency --backends torch --dims 4096 --batches 1
    python -m benchmarks.latency --dims 512 --batches 1 4 --repeats 2
    python -m benchmarks.latency --merge a/latency.json b/latency.json

`--merge` combines the JSON files of several runs (e.g. one quiet window
per backend) into one table and plot; the "auto" columns are always
computed from the current rule and the measured paths.

Writes `latency.json`, `latency.md` and `latency.png` under `--output`
(default: a folder in the system's temporary directory; pass
`--output benchmarks/results/latency` to update the committed results).
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import common
from benchmarks.common import block
from benchmarks.common import interleaved_medians
from benchmarks.common import load_average
from benchmarks.common import thread_environment

BACKENDS = ("tensorflow", "jax", "torch")
DIMS = (1024, 2048, 4096, 8192)
BATCHES = (1, 2, 4, 8, 16, 256)
K_RATIOS = (0.25, 0.45, 0.75)
E2E_WIDTH = 4096
# Without the native kernel the gathered path materializes
# `batch * min(k, chunk) * d` weights per step; skipped (null) above this
# many MiB.
GATHERED_MAX_MIB = 256.0
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_latency")


def set_threads(threads):
    import keras

    if threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)


def forward_function(layer_or_model, owned=False):
    """A compiled inference function `x -> layer(x, training=False)`.

    With `owned=True` the function is traced inside
    `keras_midl.fast_inference.native_allowed()`: this function is never
    exported, so on TensorFlow and JAX a MIDL layer may run its native
    kernel in it, as in Keras's `predict` and in the layer's own eager-call
    function (elsewhere, in a function that could be exported, it may
    not). Every candidate then runs in the same kind of compiled function.
    """
    import keras

    from keras_midl import fast_inference

    backend = keras.backend.backend()
    layer = layer_or_model
    scope = fast_inference.native_allowed if owned else contextlib.nullcontext
    if backend == "jax":
        import jax

        def stateless(trainable, non_trainable, x):
            with scope():
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

        def forward(x):
            with scope():
                return layer(x, training=False)

        # Keras's default on a CPU-only machine: a graph, without XLA.
        return tf.function(forward)
    if backend == "torch":
        import torch

        def eager(x):
            with torch.no_grad():
                return layer(x, training=False)

        return eager
    raise NotImplementedError(backend)


def raw_matmuls(kernel_t):
    """The two dense matmuls on raw backend tensors, compiled as above.

    Args:
        kernel_t: NumPy `(n, d)` (MIDL's layout, `W^T`).

    Returns:
        Dict `name -> function(x)`: `"x @ W"` (Dense's layout) and
        `"W^T layout"` (`(W^T x^T)^T`, or `F.linear` on torch).
    """
    import keras

    backend = keras.backend.backend()
    kernel = np.ascontiguousarray(kernel_t.T)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        w, wt = jnp.asarray(kernel), jnp.asarray(kernel_t)
        xw = jax.jit(lambda x, w: x @ w)
        own = jax.jit(lambda x, wt: (wt @ x.T).T)
        return {"x @ W": lambda x: xw(x, w), "W^T layout": lambda x: own(x, wt)}
    if backend == "tensorflow":
        import tensorflow as tf

        w, wt = tf.constant(kernel), tf.constant(kernel_t)
        xw = tf.function(lambda x: tf.matmul(x, w))
        own = tf.function(
            lambda x: tf.transpose(tf.matmul(wt, x, transpose_b=True))
        )
        return {"x @ W": xw, "W^T layout": own}
    if backend == "torch":
        import torch

        w, wt = torch.from_numpy(kernel), torch.from_numpy(kernel_t)

        def xw(x):
            with torch.no_grad():
                return x @ w

        def own(x):
            with torch.no_grad():
                return torch.nn.functional.linear(x, wt)

        return {"x @ W": xw, "W^T layout": own}
    raise NotImplementedError(backend)


def gathered_fits(backend, batch, k, d, max_mib):
    """Whether the gathered path is measured (see `GATHERED_MAX_MIB`)."""
    from keras_midl import fast_inference

    native = fast_inference.native_path_available(backend, native_scope=True)
    if native:  # the native kernel reads the selected rows in place
        return batch <= 16 or d <= 2048
    per_step = batch * min(k, fast_inference.CHUNK_ROWS) * d * 4 / 2**20
    return per_step <= max_mib


def prepare_layers(d):
    """Dense, the raw matmuls and the MIDL layers of one size, as
    compiled functions (shared by every batch size)."""
    import keras

    from keras_midl import MIDL

    dense = keras.layers.Dense(d)
    dense.build((None, d))
    functions = {"dense": forward_function(dense)}
    kernel_t = np.ascontiguousarray(keras.ops.convert_to_numpy(dense.kernel).T)
    functions.update(raw_matmuls(kernel_t))
    layers = {}
    for k_ratio in K_RATIOS:
        masked = MIDL(d, k_ratio=k_ratio, inference_path="masked")
        gathered = MIDL(d, k_ratio=k_ratio, inference_path="gathered")
        masked.build((None, d))
        gathered.build((None, d))
        gathered.set_weights(masked.get_weights())
        layers[k_ratio] = masked
        functions[f"masked {k_ratio}"] = forward_function(masked)
        functions[f"gathered {k_ratio}"] = forward_function(
            gathered, owned=True
        )
    return functions, layers


def prepare_group(d, batch, functions, layers, max_mib):
    """The candidates of one `d` and batch, compiled by one call each."""
    import keras
    from keras import ops

    backend = keras.backend.backend()
    rng = np.random.default_rng(d + batch)
    x = ops.convert_to_tensor(rng.normal(size=(batch, d)), "float32")
    calls = {}
    for name, function in functions.items():
        if name.startswith("gathered"):
            k = layers[float(name.split()[1])].k
            if not gathered_fits(backend, batch, k, d, max_mib):
                continue
        calls[name] = lambda f=function: f(x)
    for call in calls.values():  # compiles
        block(call())
    return {"d": d, "batch": batch, "calls": calls, "layers": layers}


def measure_group(group, repeats, threads):
    import keras

    from keras_midl import fast_inference

    backend = keras.backend.backend()
    d, batch = group["d"], group["batch"]
    for call in group["calls"].values():  # one more warm round
        block(call())
    load_before = load_average()
    medians = interleaved_medians(group["calls"], repeats=repeats)
    load_after = load_average()
    valid = all(
        load is not None and load <= 1 + max(threads, 1)
        for load in (load_before, load_after)
    )
    rows = []
    for k_ratio, layer in group["layers"].items():
        k, rank = layer.k, layer.effective_rank
        dense_s = medians["dense"]
        best_s = min(medians["x @ W"], medians["W^T layout"])
        masked_s = medians[f"masked {k_ratio}"]
        gathered_s = medians.get(f"gathered {k_ratio}")
        auto_gathers = fast_inference.use_gathered_path(
            batch, d, d, k_ratio, native_scope=True
        )
        auto_s = gathered_s if auto_gathers else masked_s

        def ratio(numerator, denominator):
            if numerator is None or denominator is None:
                return None
            return numerator / denominator

        rows.append(
            {
                "kind": "latency",
                "backend": backend,
                "threads": threads,
                "d": d,
                "k_ratio": k_ratio,
                "k": k,
                "rank": rank,
                "batch": batch,
                "dense_ms": dense_s * 1e3,
                "xw_ms": medians["x @ W"] * 1e3,
                "own_layout_ms": medians["W^T layout"] * 1e3,
                "masked_ms": masked_s * 1e3,
                "gathered_ms": None if gathered_s is None else gathered_s * 1e3,
                "auto_path": "gathered" if auto_gathers else "masked",
                "dense_over_masked": dense_s / masked_s,
                "dense_over_gathered": ratio(dense_s, gathered_s),
                "best_over_gathered": ratio(best_s, gathered_s),
                "masked_over_gathered": ratio(masked_s, gathered_s),
                "dense_over_auto": ratio(dense_s, auto_s),
                "ceiling": d * d / (k * d + rank * (d + 2 * d)),
                "load_before": load_before,
                "load_after": load_after,
                "valid": valid,
            }
        )
    return rows


def mlp(layer_factory, width):
    import keras

    return keras.Sequential(
        [
            keras.Input((width,)),
            layer_factory(width),
            layer_factory(width),
            keras.layers.Dense(10),
        ]
    )


def prepare_e2e(width):
    import keras
    from keras import ops

    from keras_midl import MIDL

    backend = keras.backend.backend()
    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(1, width)), "float32"
    )
    models = {
        "dense": mlp(lambda n: keras.layers.Dense(n, activation="relu"), width),
        "midl": mlp(
            lambda n: MIDL(
                n, k_ratio=0.45, activation="relu", inference_path="auto"
            ),
            width,
        ),
    }
    calls = {}
    for name, model in models.items():
        calls[f"{name} model(x)"] = lambda model=model: model(x)
        calls[f"{name} predict_on_batch"] = lambda model=model: (
            model.predict_on_batch(x)
        )
    if backend == "torch":  # as a user would: model(x) under no_grad
        import torch

        for name, model in models.items():

            def no_grad(model=model):
                with torch.no_grad():
                    return model(x)

            calls[f"{name} model(x) no_grad"] = no_grad
    for call in calls.values():
        block(call())
    return {"calls": calls, "models": models}


def e2e_auto_path(backend, width):
    """The path `"auto"` runs in the end-to-end model (on TensorFlow and
    JAX the native kernel may run in eager calls, `model(x)`, and in
    Keras's `predict`, so the same in both)."""
    from keras_midl import fast_inference

    gathers = fast_inference.use_gathered_path(
        1, width, width, 0.45, backend, native_scope=True
    )
    return "gathered" if gathers else "masked"


def measure_e2e(e2e, repeats, threads, width):
    import keras


    for call in e2e["calls"].values():
        block(call())
    load_before = load_average()
    medians = interleaved_medians(e2e["calls"], repeats=repeats)
    load_after = load_average()
    rows = []
    for how in ("model(x)", "predict_on_batch", "model(x) no_grad"):
        if f"dense {how}" not in medians:
            continue
        dense_s, midl_s = medians[f"dense {how}"], medians[f"midl {how}"]
        rows.append(
            {
                "kind": "e2e",
                "backend": keras.backend.backend(),
                "threads": threads,
                "model": f"MLP {width}-{width}-{width}-10, batch 1",
                "call": how,
                "auto_path": e2e_auto_path(keras.backend.backend(), width),
                "dense_ms": dense_s * 1e3,
                "midl_ms": midl_s * 1e3,
                "dense_over_midl": dense_s / midl_s,
                "load_before": load_before,
                "load_after": load_after,
                "valid": all(
                    load is not None and load <= 1 + max(threads, 1)
                    for load in (load_before, load_after)
                ),
            }
        )
    return rows


def child(args):
    set_threads(args.threads)
    groups = []
    for d in args.dims:
        functions, layers = prepare_layers(d)
        for batch in args.batches:
            groups.append(
                prepare_group(
                    d, batch, functions, layers, args.gathered_max_mib
                )
            )
            print(f"compiled d={d} batch={batch}", flush=True)
    e2e = prepare_e2e(E2E_WIDTH) if args.e2e else None
    if args.wait_for:
        open(args.wait_for + ".ready", "w").close()
        print(f"ready; waiting for {args.wait_for}", flush=True)
        while not os.path.exists(args.wait_for):
            time.sleep(1)
    rows = []
    for group in groups:
        rows.extend(measure_group(group, args.repeats, args.threads))
        print(rows[-1], flush=True)
    if e2e is not None:
        rows.extend(measure_e2e(e2e, args.repeats, args.threads, E2E_WIDTH))
        print(rows[-1], flush=True)
    if args.wait_for:
        open(args.wait_for + ".done", "w").close()
    metadata = common.environment()
    metadata["threads"] = args.threads or "backend default"
    with open(args.child, "w") as file:
        json.dump({"metadata": metadata, "rows": rows}, file)


def run_backends(args):
    outputs = {}
    settings = [
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
        "--gathered-max-mib",
        str(args.gathered_max_mib),
        "--dims",
        *map(str, args.dims),
        "--batches",
        *map(str, args.batches),
    ]
    settings.append("--e2e" if args.e2e else "--no-e2e")
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "out.json")
            env = dict(os.environ, KERAS_BACKEND=backend)
            env.update(thread_environment(args.threads))
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            command = [
                sys.executable,
                "-m",
                "benchmarks.latency",
                "--child",
                path,
                *settings,
            ]
            if args.wait_for:
                command += ["--wait-for", f"{args.wait_for}.{backend}"]
            print(f"== {backend}", flush=True)
            subprocess.run(command, env=env, check=True)
            with open(path) as file:
                outputs[backend] = json.load(file)
    return outputs


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b for b in BACKENDS if any(r["backend"] == b for r in rows)]
    figure, axes = plt.subplots(
        2,
        len(backends),
        figsize=(4.2 * len(backends), 6.8),
        squeeze=False,
    )
    for column, backend in enumerate(backends):
        own = [r for r in rows if r["backend"] == backend]
        dims = sorted({r["d"] for r in own})
        batches = sorted({r["batch"] for r in own})
        # Top: speed-up against Dense vs layer size, batch 1, per k_ratio.
        axis = axes[0][column]
        for k_ratio, color in zip(K_RATIOS, ("C0", "C1", "C2")):
            points = [
                (r["d"], r["dense_over_gathered"])
                for r in own
                if r["batch"] == 1
                and r["k_ratio"] == k_ratio
                and r["dense_over_gathered"] is not None
            ]
            if points:
                axis.plot(
                    *zip(*points),
                    "o-",
                    color=color,
                    label=f"gathered, k_ratio {k_ratio}",
                )
            ceiling = [
                (r["d"], r["ceiling"])
                for r in own
                if r["batch"] == 1 and r["k_ratio"] == k_ratio
            ]
            axis.plot(*zip(*ceiling), ":", color=color, linewidth=0.8)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(dims, [str(d) for d in dims])
        axis.set_title(f"{backend}: batch 1 (dotted: ceiling)")
        axis.set_xlabel("d = n")
        if column == 0:
            axis.set_ylabel("Dense time / MIDL time")
        axis.legend(fontsize=7)
        # Bottom: speed-up vs batch, k_ratio 0.45, per layer size.
        axis = axes[1][column]
        for d, color in zip(dims, ("C0", "C1", "C2", "C3")):
            points = [
                (r["batch"], r["dense_over_gathered"])
                for r in own
                if r["d"] == d
                and r["k_ratio"] == 0.45
                and r["dense_over_gathered"] is not None
            ]
            if points:
                axis.plot(
                    *zip(*points),
                    "o-",
                    color=color,
                    label=f"gathered, d = n = {d}",
                )
            masked = [
                (r["batch"], r["dense_over_masked"])
                for r in own
                if r["d"] == d and r["k_ratio"] == 0.45
            ]
            axis.plot(*zip(*masked), "x--", color=color, linewidth=0.8)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_title(f"{backend}: k_ratio 0.45 (dashed: masked)")
        axis.set_xlabel("batch")
        if column == 0:
            axis.set_ylabel("Dense time / MIDL time (log)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


LATENCY_COLUMNS = [
    ("backend", "Backend", None),
    (lambda r: str(r["threads"] or "default"), "Threads", None),
    ("d", "d = n", None),
    ("k_ratio", "k_ratio", None),
    ("batch", "Batch", None),
    ("dense_ms", "Dense", ".3f"),
    ("xw_ms", "x @ W", ".3f"),
    ("own_layout_ms", "W^T layout", ".3f"),
    ("masked_ms", "Masked", ".3f"),
    ("gathered_ms", "Gathered", ".3f"),
    ("dense_over_gathered", "Dense / gathered", ".2f"),
    ("best_over_gathered", "Best dense / gathered", ".2f"),
    ("dense_over_masked", "Dense / masked", ".2f"),
    ("auto_path", "auto runs", None),
    ("dense_over_auto", "Dense / auto", ".2f"),
    ("ceiling", "Ceiling", ".2f"),
    (
        lambda r: f"{r['load_before']:.2f} / {r['load_after']:.2f}",
        "Load before / after",
        None,
    ),
    (lambda r: "yes" if r["valid"] else "**no**", "Valid", None),
]

E2E_COLUMNS = [
    ("backend", "Backend", None),
    (lambda r: str(r["threads"] or "default"), "Threads", None),
    ("model", "Model", None),
    ("call", "Call", None),
    ("auto_path", "auto runs", None),
    ("dense_ms", "Dense (ms)", ".3f"),
    ("midl_ms", "MIDL (ms)", ".3f"),
    ("dense_over_midl", "Dense / MIDL", ".2f"),
    (
        lambda r: f"{r['load_before']:.2f} / {r['load_after']:.2f}",
        "Load before / after",
        None,
    ),
    (lambda r: "yes" if r["valid"] else "**no**", "Valid", None),
]


def apply_auto_rule(rows):
    """(Re)computes the `"auto"` columns with the current rule
    (`keras_midl.fast_inference.AUTO_RULES`) from the measured paths."""
    from keras_midl import fast_inference

    for row in rows:
        if row["kind"] == "e2e":
            row["auto_path"] = e2e_auto_path(
                row["backend"], int(row["model"].split("-")[1])
            )
        if row["kind"] != "latency":
            continue
        gathers = fast_inference.use_gathered_path(
            row["batch"],
            row["d"],
            row["d"],
            row["k_ratio"],
            backend=row["backend"],
            native_scope=True,  # TensorFlow, JAX: as measured (owned)
        )
        auto_ms = row["gathered_ms"] if gathers else row["masked_ms"]
        row["auto_path"] = "gathered" if gathers else "masked"
        row["dense_over_auto"] = (
            None if auto_ms is None else row["dense_ms"] / auto_ms
        )
    return rows


def merge(paths, args):
    """Merges the JSON results of several runs into one set of files."""
    runs = []
    for path in paths:
        with open(path) as file:
            runs.append(json.load(file))
    rows = [row for run in runs for row in run["rows"]]
    metadata = runs[0]["metadata"]
    metadata["runs"] = [
        {
            key: run["metadata"].get(key)
            for key in ("command", "backend", "date", "threads")
        }
        for run in runs
    ]
    metadata["command"] = (
        "; ".join(run["metadata"]["command"] for run in runs)
        + f"; merged by: {common.command_line()}"
    )
    metadata["backend"] = ", ".join(
        dict.fromkeys(row["backend"] for row in rows)
    )
    write_rows(rows, metadata, args)


def write_results(outputs, args):
    rows = [row for output in outputs.values() for row in output["rows"]]
    metadata = next(iter(outputs.values()))["metadata"]
    metadata["command"] = common.command_line()
    metadata["backend"] = ", ".join(outputs)
    metadata["threads"] = args.threads or "backend default"
    write_rows(rows, metadata, args)


def write_rows(rows, metadata, args):
    rows = apply_auto_rule(rows)
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, args.name)
    common.write_json(stem + ".json", rows, metadata)
    latency = [row for row in rows if row["kind"] == "latency"]
    e2e = [row for row in rows if row["kind"] == "e2e"]
    common.write_markdown(
        stem + ".md",
        latency,
        metadata,
        title="Inference latency of one layer, d = n (median, ms)",
        columns=LATENCY_COLUMNS,
        notes=(
            "Dense: keras.layers.Dense. x @ W, W^T layout: raw backend "
            "matmuls in Dense's layout and in MIDL's (the faster is 'best "
            'dense\'). Gathered: `inference_path="gathered"` (the '
            "backend's fast path); null (—) where not measured (TF/JAX: "
            "more than --gathered-max-mib MiB gathered per chunk; torch: "
            "batch 256 at d >= 4096, for time). Ratios above 1: MIDL "
            "faster. Ceiling: n*d / (k*d + r*(d + 2n)). Valid: both load "
            "readings at most 1 + threads."
        ),
    )
    with open(stem + ".md", "a") as file:
        if e2e:
            file.write(
                "\n## End to end, batch 1\n\n"
                + common.markdown_table(e2e, E2E_COLUMNS)
                + "\n"
            )
        file.write(f"\n![speed-up]({args.name}.png)\n")
    if latency:
        plot(latency, stem + ".png")
    print(open(stem + ".md").read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1, help="0: backend defaults"
    )
    parser.add_argument(
        "--gathered-max-mib", type=float, default=GATHERED_MAX_MIB
    )
    parser.add_argument(
        "--dims",
        type=int,
        nargs="*",
        default=list(DIMS),
        help="layer sizes; none: only the end-to-end MLP",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="merge the JSON results of earlier runs instead of measuring",
    )
    parser.add_argument(
        "--e2e",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the batch-1 MLP end to end",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--name", default="latency", help="file name stem")
    parser.add_argument(
        "--wait-for",
        help="compile, create FILE.<backend>.ready, time once "
        "FILE.<backend> exists",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.merge:
        merge(args.merge, args)
        return
    write_results(run_backends(args), args)


if __name__ == "__main__":
    main()
