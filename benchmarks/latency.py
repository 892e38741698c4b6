"""Inference latency of one MIDL layer against Dense, and of an MLP.

Per backend (one child process each, `KERAS_BACKEND` being fixed per
process), for square layers `d = n` in {1024, 2048, 4096, 8192}, batch in
{1, 2, 4, 8, 16, 256} and `k_ratio` in {0.25, 0.45, 0.75}, every
candidate timed the way a user calls it, all interleaved in one round
robin after warm-up, `--repeats` rounds, same weights:

* `keras.layers.Dense(n)` in a compiled forward (below), and the two raw
  dense matmuls (`x @ W`, Dense's layout, and the product in the layout
  MIDL stores its kernel in, computed as MIDL's full path computes it,
  `keras_midl.backend`'s `matmul_transposed`, or `F.linear` on torch; the
  faster is "best dense");
* `MIDL(n)` with `inference_path="masked"` in a compiled forward;
* `MIDL(n)` with `inference_path="gathered"` in an eager call, `layer(x)`
  (on PyTorch under `torch.no_grad()`): the native kernel where it applies
  (`keras_midl.ops.dispatch.native_applies`), rows labelled
  "eager call (native)";
* on TensorFlow and JAX, the same gathered layer inside the user's own
  compiled function (the compiled forward below), where the layer runs
  `keras.ops` only (the chunked gathered path,
  `keras_midl.ops.gathered`), rows labelled "in a traced function
  (keras.ops)". On PyTorch a plain call is the eager call above, so there
  is no such row.

`inference_path="auto"` runs one of the two MIDL paths
(`keras_midl.ops.dispatch.use_gathered_path`): in an eager call with the
native kernel by `NATIVE_AUTO_RULES`, inside a trace by
`TRACED_AUTO_RULES`; its time is that path's, reported with the path it
picks, per row ("auto, eager call (native)", "auto, in a traced function
(keras.ops)"). Also:

* the analytic ceiling of the speed-up, `n*d / (k*d + r*(d + 2n))`;
* end to end: a `Sequential` MLP 4096-4096-4096-10 (two hidden layers,
  ReLU) with MIDL (`inference_path="auto"`) against the same MLP with
  Dense, at batch 1, called as `model(x)` (eager: the native kernel) and
  `model.predict_on_batch(x)` (traced on TensorFlow and JAX: `keras.ops`;
  eager on PyTorch).

The compiled forward is what Keras runs in `predict` on a CPU-only
machine: `tf.function` without XLA on TensorFlow, `jax.jit` of
`stateless_call` on JAX, eager on PyTorch under `torch.no_grad()`. The
native kernel runs only in eager calls (`keras_midl.ops.dispatch`): on
TensorFlow and JAX never inside a `tf.function`, a `jax.jit` or Keras's
`predict`.
`--threads 1` (default) limits each backend to one thread; `--threads 0`
leaves the backends' default threading.

The 1-minute load average is read before and after each group of
measurements (one `d` and batch); a group is flagged not valid when either
reading exceeds 1 per thread (`common.load_valid`). After a group's
warm-up the benchmark waits for the load to fall to 0.5
(`common.wait_for_quiet`), and its timing loop rests as long as it
works, so its own thread adds about 0.5: a higher reading means another
job ran.
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
import json
import os
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
# Outside the native kernel (inside a trace, or where the kernel cannot
# run) the gathered path materializes `batch * min(k, chunk) * d` weights
# per step; skipped (null) above this many MiB.
GATHERED_MAX_MIB = 256.0
# How the gathered (and `auto`) MIDL layer of a latency row was called.
EAGER_NATIVE = "eager call (native)"
EAGER_NO_NATIVE = "eager call (no native kernel)"
TRACED = "in a traced function (keras.ops)"
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_latency")


def set_threads(threads):
    import keras

    if threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(threads)


def forward_function(layer_or_model):
    """A compiled inference function `x -> layer(x, training=False)`, as a
    user compiles one (and as Keras's `predict` runs on a CPU-only
    machine): `tf.function` without XLA, `jax.jit` of `stateless_call`,
    eager torch under `torch.no_grad()`.

    Inside the `tf.function` and the `jax.jit` a MIDL layer runs
    `keras.ops` only, never the native kernel.
    """
    import keras

    backend = keras.backend.backend()
    layer = layer_or_model
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

        def forward(x):
            return layer(x, training=False)

        # Keras's default on a CPU-only machine: a graph, without XLA.
        return tf.function(forward)
    if backend == "torch":
        return eager_function(layer)
    raise NotImplementedError(backend)


def eager_function(layer):
    """An eager call `x -> layer(x, training=False)`, as `layer(x)` and
    `model(x)` run (on torch under `torch.no_grad()`): where a MIDL layer
    runs its native kernel."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        def eager(x):
            with torch.no_grad():
                return layer(x, training=False)

        return eager
    return lambda x: layer(x, training=False)


def native_runs(layer):
    """Whether an eager call of this gathered MIDL layer runs the native
    kernel: `keras_midl.ops.dispatch.native_applies` and a CPU device."""
    import keras

    from keras_midl.ops import dispatch

    if not dispatch.native_applies(layer):
        return False
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    if backend == "torch":
        return layer.kernel.value.device.type == "cpu"
    return False


def raw_matmuls(kernel_t):
    """The two dense matmuls on raw backend tensors, compiled as above.

    Args:
        kernel_t: NumPy `(n, d)` (MIDL's layout, `W^T`).

    Returns:
        Dict `name -> function(x)`: `"x @ W"` (Dense's layout) and
        `"W^T layout"`: the product in MIDL's layout as MIDL's full path
        computes it (`matmul_transposed` of `keras_midl.backend`), or
        `F.linear` on torch.
    """
    import keras

    from keras_midl import backend as backends

    product = backends.current().matmul_transposed

    backend = keras.backend.backend()
    kernel = np.ascontiguousarray(kernel_t.T)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        w, wt = jnp.asarray(kernel), jnp.asarray(kernel_t)
        xw = jax.jit(lambda x, w: x @ w)
        own = jax.jit(product)
        return {"x @ W": lambda x: xw(x, w), "W^T layout": lambda x: own(x, wt)}
    if backend == "tensorflow":
        import tensorflow as tf

        w, wt = tf.constant(kernel), tf.constant(kernel_t)
        xw = tf.function(lambda x: tf.matmul(x, w))
        own = tf.function(lambda x: product(x, wt))
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


def gathered_fits(batch, k, d, max_mib, native):
    """Whether the gathered path is measured (see `GATHERED_MAX_MIB`);
    `native`: whether the call runs the native kernel."""
    from keras_midl.ops import gathered

    if native:  # the native kernel reads the selected rows in place
        return batch <= 16 or d <= 2048
    per_step = batch * min(k, gathered.CHUNK_ROWS) * d * 4 / 2**20
    return per_step <= max_mib


def prepare_layers(d):
    """Dense, the raw matmuls and the MIDL layers of one size, as the
    functions a user calls (shared by every batch size).

    Returns:
        `(functions, layers, variants)`: `name -> function(x)`;
        `k_ratio -> masked MIDL layer`; `name -> (k_ratio, variant)` for
        the gathered candidates (`EAGER_NATIVE` or `EAGER_NO_NATIVE`:
        `"gathered {k_ratio}"`, `layer(x)`; `TRACED`:
        `"gathered traced {k_ratio}"`, in a compiled forward, TensorFlow
        and JAX only).
    """
    import keras

    from keras_midl import MIDL

    backend = keras.backend.backend()
    dense = keras.layers.Dense(d)
    dense.build((None, d))
    functions = {"dense": forward_function(dense)}
    kernel_t = np.ascontiguousarray(keras.ops.convert_to_numpy(dense.kernel).T)
    functions.update(raw_matmuls(kernel_t))
    layers, variants = {}, {}
    for k_ratio in K_RATIOS:
        masked = MIDL(d, k_ratio=k_ratio, inference_path="masked")
        gathered = MIDL(d, k_ratio=k_ratio, inference_path="gathered")
        masked.build((None, d))
        gathered.build((None, d))
        gathered.set_weights(masked.get_weights())
        layers[k_ratio] = masked
        functions[f"masked {k_ratio}"] = forward_function(masked)
        name = f"gathered {k_ratio}"
        functions[name] = eager_function(gathered)
        eager = EAGER_NATIVE if native_runs(gathered) else EAGER_NO_NATIVE
        variants[name] = (k_ratio, eager)
        if backend != "torch":  # on torch a plain call is the eager one
            name = f"gathered traced {k_ratio}"
            functions[name] = forward_function(gathered)
            variants[name] = (k_ratio, TRACED)
    return functions, layers, variants


def prepare_group(d, batch, functions, layers, variants, max_mib):
    """The candidates of one `d` and batch, compiled by one call each."""
    from keras import ops

    rng = np.random.default_rng(d + batch)
    x = ops.convert_to_tensor(rng.normal(size=(batch, d)), "float32")
    calls = {}
    for name, function in functions.items():
        if name in variants:
            k_ratio, variant = variants[name]
            native = variant == EAGER_NATIVE
            if not gathered_fits(batch, layers[k_ratio].k, d, max_mib, native):
                continue
        calls[name] = lambda f=function: f(x)
    for call in calls.values():  # compiles
        block(call())
    return {
        "d": d,
        "batch": batch,
        "calls": calls,
        "layers": layers,
        "variants": variants,
    }


def measure_group(group, repeats, threads):
    import keras

    backend = keras.backend.backend()
    d, batch = group["d"], group["batch"]
    for call in group["calls"].values():  # one more warm round
        block(call())
    load_before = common.wait_for_quiet()
    medians = interleaved_medians(group["calls"], repeats=repeats)
    load_after = load_average()
    valid = common.load_valid((load_before, load_after), threads)

    def ratio(numerator, denominator):
        if numerator is None or denominator is None:
            return None
        return numerator / denominator

    rows = []
    for name, (k_ratio, variant) in group["variants"].items():
        layer = group["layers"][k_ratio]
        k, rank = layer.k, layer.effective_rank
        dense_s = medians["dense"]
        best_s = min(medians["x @ W"], medians["W^T layout"])
        masked_s = medians[f"masked {k_ratio}"]
        gathered_s = medians.get(name)
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
                "variant": variant,
                "dense_ms": dense_s * 1e3,
                "xw_ms": medians["x @ W"] * 1e3,
                "own_layout_ms": medians["W^T layout"] * 1e3,
                "masked_ms": masked_s * 1e3,
                "gathered_ms": None if gathered_s is None else gathered_s * 1e3,
                "dense_over_masked": dense_s / masked_s,
                "dense_over_gathered": ratio(dense_s, gathered_s),
                "best_over_gathered": ratio(best_s, gathered_s),
                "masked_over_gathered": ratio(masked_s, gathered_s),
                "ceiling": d * d / (k * d + rank * (d + 2 * d)),
                "load_before": load_before,
                "load_after": load_after,
                "valid": valid,
            }
        )
    return apply_auto_rule(rows)


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
    midl_layers = models["midl"].layers[:-1]
    native = all(native_runs(layer) for layer in midl_layers)
    return {"calls": calls, "models": models, "native": native}


def traced_rule(backend, variant=None, call=None, native=None):
    """Whether `"auto"` follows `TRACED_AUTO_RULES` (the `keras.ops` path
    inside a trace) rather than `NATIVE_AUTO_RULES` (the native kernel in
    an eager call) for a latency row (`variant`) or an end-to-end call.

    Inside a trace: the `TRACED` rows, and `predict_on_batch` on
    TensorFlow and JAX (on torch Keras's `predict` runs eagerly). An eager
    call where the native kernel cannot run runs the layer's compiled call
    on TensorFlow and JAX, a trace; on torch `"auto"` then runs masked
    (no torch entry in `TRACED_AUTO_RULES`). Rows of earlier runs, without
    a `variant` or `native` field (native kernel in every call, traced
    ones included), follow `NATIVE_AUTO_RULES`.
    """
    if variant is not None:
        return variant != EAGER_NATIVE
    if native is None:
        return False
    if call == "predict_on_batch" and backend != "torch":
        return True
    return not native


def e2e_auto_path(backend, width, call, native=True):
    """The path `"auto"` runs in the end-to-end model for one way of
    calling it (`model(x)`: an eager call, the native kernel;
    `predict_on_batch` on TensorFlow and JAX: a trace, `keras.ops`);
    `native`: whether the model's eager calls run the native kernel, `None`
    for rows of earlier runs (see `traced_rule`)."""
    from keras_midl.ops import dispatch

    gathers = dispatch.use_gathered_path(
        1,
        width,
        width,
        0.45,
        backend,
        traced=traced_rule(backend, call=call, native=native),
    )
    return "gathered" if gathers else "masked"


def measure_e2e(e2e, repeats, threads, width):
    import keras

    backend = keras.backend.backend()
    for call in e2e["calls"].values():
        block(call())
    load_before = common.wait_for_quiet()
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
                "backend": backend,
                "threads": threads,
                "model": f"MLP {width}-{width}-{width}-10, batch 1",
                "call": how,
                "native": e2e["native"],
                "auto_path": e2e_auto_path(
                    backend, width, how, native=e2e["native"]
                ),
                "dense_ms": dense_s * 1e3,
                "midl_ms": midl_s * 1e3,
                "dense_over_midl": dense_s / midl_s,
                "load_before": load_before,
                "load_after": load_after,
                "valid": common.load_valid((load_before, load_after), threads),
            }
        )
    return rows


def child(args):
    set_threads(args.threads)
    groups = []
    for d in args.dims:
        functions, layers, variants = prepare_layers(d)
        for batch in args.batches:
            groups.append(
                prepare_group(
                    d,
                    batch,
                    functions,
                    layers,
                    variants,
                    args.gathered_max_mib,
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
    common.write_child_output(
        args.child, rows, threads=args.threads or "backend default"
    )


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
            common.run_child(command, args.threads, env=env)
            with open(path) as file:
                outputs[backend] = json.load(file)
    return outputs


def plot(rows, path):
    """Dense / gathered per backend: eager calls (solid), inside a traced
    function (dash-dotted, TensorFlow and JAX); the ceiling (top, dotted)
    and the masked path (bottom, dashed)."""
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
        # One row per cell and way of calling; the eager rows (every
        # backend has them) carry the cell's Dense, masked and ceiling.
        eager = [r for r in own if r.get("variant") != TRACED]
        traced = [r for r in own if r.get("variant") == TRACED]
        lines = (("eager", eager, "o-", 1.5), ("traced", traced, "^-.", 0.9))
        dims = sorted({r["d"] for r in own})
        batches = sorted({r["batch"] for r in own})
        # Top: speed-up against Dense vs layer size, batch 1, per k_ratio.
        axis = axes[0][column]
        for k_ratio, color in zip(K_RATIOS, ("C0", "C1", "C2")):
            for how, part, style, width in lines:
                points = [
                    (r["d"], r["dense_over_gathered"])
                    for r in part
                    if r["batch"] == 1
                    and r["k_ratio"] == k_ratio
                    and r["dense_over_gathered"] is not None
                ]
                if points:
                    axis.plot(
                        *zip(*points),
                        style,
                        color=color,
                        linewidth=width,
                        label=f"gathered {how}, k_ratio {k_ratio}",
                    )
            ceiling = [
                (r["d"], r["ceiling"])
                for r in eager
                if r["batch"] == 1 and r["k_ratio"] == k_ratio
            ]
            axis.plot(*zip(*ceiling), ":", color=color, linewidth=0.8)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(dims, [str(d) for d in dims])
        axis.set_title(f"{backend}: batch 1 (dotted: ceiling)", fontsize=9)
        axis.set_xlabel("d = n")
        if column == 0:
            axis.set_ylabel("Dense time / MIDL time")
        axis.legend(fontsize=7)
        # Bottom: speed-up vs batch, k_ratio 0.45, per layer size.
        axis = axes[1][column]
        for d, color in zip(dims, ("C0", "C1", "C2", "C3")):
            for how, part, style, width in lines:
                points = [
                    (r["batch"], r["dense_over_gathered"])
                    for r in part
                    if r["d"] == d
                    and r["k_ratio"] == 0.45
                    and r["dense_over_gathered"] is not None
                ]
                if points:
                    axis.plot(
                        *zip(*points),
                        style,
                        color=color,
                        linewidth=width,
                        label=f"gathered {how}, d = n = {d}",
                    )
            masked = [
                (r["batch"], r["dense_over_masked"])
                for r in eager
                if r["d"] == d and r["k_ratio"] == 0.45
            ]
            axis.plot(*zip(*masked), "x--", color=color, linewidth=0.8)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_title(f"{backend}: k_ratio 0.45 (dashed: masked)", fontsize=9)
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
    ("variant", "Gathered, auto: called as", None),
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
    """(Re)computes the `"auto"` columns with the current rules from the
    measured paths: `keras_midl.ops.dispatch.NATIVE_AUTO_RULES` for the
    eager rows with the native kernel ("auto, eager call (native)"),
    `TRACED_AUTO_RULES` for the rows inside a trace ("auto, in a traced
    function (keras.ops)"), see `traced_rule`."""
    from keras_midl.ops import dispatch

    for row in rows:
        if row["kind"] == "e2e":
            row["auto_path"] = e2e_auto_path(
                row["backend"],
                int(row["model"].split("-")[1]),
                row["call"],
                native=row.get("native"),
            )
        if row["kind"] != "latency":
            continue
        gathers = dispatch.use_gathered_path(
            row["batch"],
            row["d"],
            row["d"],
            row["k_ratio"],
            backend=row["backend"],
            traced=traced_rule(row["backend"], variant=row.get("variant")),
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
    rows, metadata = common.combined_outputs(outputs, backend_note="")
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
            "matmuls in Dense's layout and in MIDL's, the latter as MIDL's "
            "full path computes it (the faster is 'best dense'). Dense, "
            "masked: in a compiled forward (tf.function "
            "without XLA, jax.jit, eager torch under no_grad). Gathered: "
            '`inference_path="gathered"`, called as the row says: '
            f"'{EAGER_NATIVE}' is `layer(x)` (torch: under no_grad), the "
            f"native kernel; '{TRACED}' the compiled forward, where the "
            "layer runs the chunked keras.ops path (TF/JAX only). auto "
            'runs: the path `inference_path="auto"` takes called the same '
            "way (NATIVE_AUTO_RULES for the eager rows, TRACED_AUTO_RULES "
            "for the traced ones); its time is that path's. Null (—) where "
            "not measured (outside the native kernel: more than "
            "--gathered-max-mib MiB gathered per chunk; native kernel: "
            "batch 256 at d >= 4096, for time). Ratios above 1: MIDL "
            "faster. Ceiling: n*d / (k*d + r*(d + 2n)). Valid: both load "
            "readings at most 1 per thread (`common.load_valid`); each "
            "group waits for the load to fall to 0.5 after its warm-up."
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
