"""Batch-1 CPU latency of MIDLConv2D against Conv2D, in Keras and exported.

Per backend (one child process each, one thread by default), for each
shape `HxWxC_INxC_OUT` of `--shapes` (default `32x32x128x128`; issue
23's table: `32x32x64x64 32x32x128x128 16x16x256x256 8x8x512x512`), one
single-layer model `keras.Input((H, W, C_IN)) -> layer` per variant:

* `conv2d`: `keras.layers.Conv2D(C_OUT, 3, padding="same")`;
* `gathered`: `MIDLConv2D(C_OUT, 3, padding="same", k_ratio=0.45,
  inference_path="gathered")`: the k selected filters gathered and
  convolved alone (keras.ops only);
* `auto`: the same with `inference_path="auto"` (gathered at a static
  batch of at most 4, masked otherwise);
* `gathered_k8`, `gathered_k16`: gathered with `k_multiple=8` or 16 (k
  rounded up to a multiple), to measure the rounding.

Each is timed as a user calls it on a `(1, H, W, C_IN)` batch: `model(x)`
(runtime `keras`; eager, on PyTorch under `torch.no_grad()`) and
`model.predict_on_batch(x)` (runtime `predict_on_batch`: a compiled
trace on TensorFlow and JAX, eager on PyTorch). For the shapes of
`--export-shapes` (default: the first of `--shapes`), `conv2d` and
`gathered` (the variants of `--export-variants`) are also exported with
a static batch of 1 (`input_signature=[keras.InputSpec(shape=(1, H, W,
C_IN))]`) and served:

* `tf_saved_model`: `model.export(dir, format="tf_saved_model")`
  (TensorFlow; JAX through jax2tf), reloaded with `tf.saved_model.load`
  in the same child and timed as `served.serve(x)`. Keras has no
  SavedModel export from PyTorch.
* `onnxruntime`: `model.export(path, format="onnx")` (TensorFlow through
  tf2onnx, PyTorch through `torch.onnx`, JAX where Keras can), served
  by `onnxruntime.InferenceSession` with one intra-op thread.

An export or reload that fails is recorded with its error text, not
hidden; the served output is compared with `model(x)` (max abs
difference), and the ONNX graph's operators are counted (which path an
export recorded: the gathered path has per-example `Gather`s of the
kernel). Every callable of a shape is timed in one interleaved round
robin after two warm-up calls each (`common.interleaved_medians`, medians
of `--repeats` rounds). The load average is read before and after each
shape, after waiting for it to fall to 0.5 (`common.wait_for_quiet`);
a shape's timings are not valid when either reading exceeds 1 per thread
(`common.load_valid`). Reported: milliseconds per call, Conv2D time / variant
time per backend and runtime, and the multiply-adds ratio (Conv2D over
the MIDL layer's, gate and light path included), the ceiling at equal
speed per multiply-add.

Usage:

    python -m benchmarks.latency_conv --output benchmarks/results/latency_conv
    python -m benchmarks.latency_conv --shapes 32x32x64x64 32x32x128x128 \\
        16x16x256x256 8x8x512x512 --export-shapes 32x32x128x128
    python -m benchmarks.latency_conv --backends torch --repeats 3

Writes `<name>.json` and `<name>.md` (default name `latency_conv`) under
`--output` (default: a folder in the system's temporary directory).
"""

import argparse
import os
import re
import tempfile

import numpy as np

from benchmarks import common
from benchmarks.common import block
from benchmarks.common import interleaved_medians
from benchmarks.common import load_average

BACKENDS = ("tensorflow", "jax", "torch")
SHAPES = ("32x32x128x128",)
ISSUE_SHAPES = ("32x32x64x64", "32x32x128x128", "16x16x256x256",
                "8x8x512x512")
K_RATIO = 0.45
# Variant name -> MIDLConv2D arguments (None: Conv2D, the baseline).
VARIANTS = {
    "conv2d": None,
    "gathered": {"inference_path": "gathered"},
    "auto": {"inference_path": "auto"},
    "gathered_k8": {"inference_path": "gathered", "k_multiple": 8},
    "gathered_k16": {"inference_path": "gathered", "k_multiple": 16},
}
LABELS = {
    "conv2d": "Conv2D",
    "gathered": "MIDL gathered",
    "auto": "MIDL auto",
    "gathered_k8": "MIDL gathered k8",
    "gathered_k16": "MIDL gathered k16",
}
EXPORT_VARIANTS = ("conv2d", "gathered")
RUNTIMES = ("keras", "predict_on_batch", "tf_saved_model", "onnxruntime")
IN_PROCESS = ("keras", "predict_on_batch")
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_latency")


def parse_shape(text):
    """`"32x32x128x64"` -> `(32, 32, 128, 64)` (H, W, C_in, C_out)."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)x(\d+)", text.strip())
    if not match or not all(int(g) > 0 for g in match.groups()):
        raise argparse.ArgumentTypeError(
            f"expected HxWxC_INxC_OUT of positive integers, e.g. "
            f"32x32x128x128. Received: {text!r}"
        )
    return tuple(int(g) for g in match.groups())


def shape_name(shape):
    return "x".join(map(str, shape))


def runtimes_of(backend):
    """The runtimes tried on a backend (Keras has no SavedModel export
    from PyTorch)."""
    if backend == "torch":
        return ("keras", "predict_on_batch", "onnxruntime")
    return RUNTIMES


def build_models(shape, variants):
    """One single-layer functional model per variant, same seed."""
    import keras

    from keras_midl import MIDLConv2D

    height, width, channels_in, channels_out = shape
    result = {}
    for name in variants:
        keras.utils.set_random_seed(0)
        config = VARIANTS[name]
        if config is None:
            layer = keras.layers.Conv2D(channels_out, 3, padding="same")
        else:
            layer = MIDLConv2D(channels_out, 3, padding="same",
                               k_ratio=K_RATIO, **config)
        inputs = keras.Input((height, width, channels_in))
        result[name] = keras.Model(inputs, layer(inputs), name="one_layer")
    return result


def multiply_adds(model):
    """Multiply-adds per example of the model (None where the count
    fails: the error is the count's, not the timing's)."""
    from keras_midl import flops

    try:
        return flops.model_multiply_adds(model)
    except ValueError:
        return None


def eager_call(model, x):
    """`model(x)` as a user calls it (under `torch.no_grad()` on
    PyTorch)."""
    import keras

    if keras.backend.backend() == "torch":
        import torch

        def call():
            with torch.no_grad():
                return model(x)

        return call
    return lambda: model(x)


def _error_text(error):
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 4000 else text[:4000] + " [...]"


def export_saved_model(model, x, folder):
    """Exports `model` as a TF SavedModel with a static batch, reloads it
    with `tf.saved_model.load`; returns `served.serve(x)` as a callable."""
    import keras
    import tensorflow as tf

    path = os.path.join(folder, "saved_model")
    model.export(
        path, format="tf_saved_model", verbose=False,
        input_signature=[keras.InputSpec(shape=x.shape, dtype="float32")],
    )
    served = tf.saved_model.load(path)
    x_tf = tf.constant(x)
    return lambda: served.serve(x_tf)


def export_onnx(model, x, folder, threads):
    """Exports `model` as ONNX with a static batch, opens it in
    onnxruntime with `threads` intra-op threads; returns the call."""
    import keras
    import onnxruntime

    path = os.path.join(folder, "model.onnx")
    model.export(
        path, format="onnx", verbose=False,
        input_signature=[keras.InputSpec(shape=x.shape, dtype="float32")],
    )
    import onnx

    graph = onnx.load(path).graph
    operators = {}
    for node in graph.node:
        operators[node.op_type] = operators.get(node.op_type, 0) + 1
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(threads, 1) if threads else 0
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        path, options, providers=["CPUExecutionProvider"]
    )
    (spec,) = session.get_inputs()

    def call():
        return session.run(None, {spec.name: x})

    call.operators = dict(sorted(operators.items()))
    return call


def _numpy(value):
    if isinstance(value, (list, tuple)):
        value = value[0]
    if isinstance(value, dict):
        value = next(iter(value.values()))
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value)


def exported_calls(models, x, folder, runtimes, threads, export_variants):
    """`({(variant, runtime): call}, {(variant, runtime): error},
    {(variant, runtime): max abs difference to model(x)})`; an ONNX
    call has an `operators` attribute (operator type -> count)."""
    import keras

    calls, errors, differences = {}, {}, {}
    exporters = {
        "tf_saved_model": export_saved_model,
        "onnxruntime": lambda m, v, f: export_onnx(m, v, f, threads),
    }
    for variant in export_variants:
        if variant not in models:
            continue
        model = models[variant]
        expected = _numpy(keras.ops.convert_to_numpy(model(x)))
        for runtime in runtimes:
            if runtime in IN_PROCESS:
                continue
            key = (variant, runtime)
            where = os.path.join(folder, f"{variant}_{runtime}".replace(
                " ", "_"))
            os.makedirs(where, exist_ok=True)
            try:
                call = exporters[runtime](model, x, where)
                served = _numpy(call())
            except Exception as error:  # every failure is recorded as text
                errors[key] = _error_text(error)
                continue
            calls[key] = call
            differences[key] = float(np.max(np.abs(served - expected)))
    return calls, errors, differences


def measure(shape, args, folder):
    """Rows of one shape on the current backend: one per runtime."""
    import keras
    from keras import ops

    backend = keras.backend.backend()
    models = build_models(shape, args.variants)
    height, width, channels_in, _ = shape
    x_numpy = np.random.default_rng(1).normal(
        size=(1, height, width, channels_in)
    ).astype("float32")
    x = ops.convert_to_tensor(x_numpy)
    calls = {}
    for name, model in models.items():
        calls[(name, "keras")] = eager_call(model, x)
        calls[(name, "predict_on_batch")] = (
            lambda model=model: model.predict_on_batch(x)
        )
    errors, differences = {}, {}
    if shape in args.export_shapes:
        exported, errors, differences = exported_calls(
            models, x_numpy, folder, runtimes_of(backend), args.threads,
            args.export_variants,
        )
        calls.update(exported)
    for call in calls.values():  # warm-up: traces, compiles, caches
        block(call())
        block(call())
    named = {f"{v} | {r}": call for (v, r), call in calls.items()}
    load_before = common.wait_for_quiet()
    medians = interleaved_medians(named, repeats=args.repeats)
    load_after = load_average()
    counts = {name: multiply_adds(model) for name, model in models.items()}
    ks = {name: int(model.layers[-1].k) for name, model in models.items()
          if hasattr(model.layers[-1], "k")}
    valid = common.load_valid((load_before, load_after), args.threads)
    rows = []
    for runtime in runtimes_of(backend):
        present = [v for v in models if (v, runtime) in calls]
        failed = {v: errors[(v, runtime)] for v in models
                  if (v, runtime) in errors}
        if not present and not failed:
            continue
        ms = {v: medians[f"{v} | {runtime}"] * 1e3 for v in present}
        conv_ms = ms.get("conv2d")
        rows.append({
            "backend": backend,
            "threads": args.threads,
            "shape": shape_name(shape),
            "height": height,
            "width": width,
            "channels_in": channels_in,
            "channels_out": shape[3],
            "runtime": runtime,
            "k_ratio": K_RATIO,
            "k": ks,
            "ms": ms,
            "conv_over": {
                v: conv_ms / t for v, t in ms.items()
                if conv_ms is not None and v != "conv2d"
            },
            "multiply_adds": counts,
            "multiply_adds_ratio": {
                v: counts["conv2d"] / c for v, c in counts.items()
                if v != "conv2d" and c and counts.get("conv2d")
            },
            "max_abs_difference": {
                v: differences[(v, runtime)] for v in present
                if (v, runtime) in differences
            },
            "onnx_operators": {
                v: calls[(v, runtime)].operators for v in present
                if hasattr(calls[(v, runtime)], "operators")
            },
            "errors": failed,
            "load_before": load_before,
            "load_after": load_after,
            "valid": valid,
        })
    return rows


def child(args):
    import keras

    if args.threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, shape in enumerate(args.shapes):
            where = os.path.join(folder, str(index))
            os.makedirs(where)
            for row in measure(shape, args, where):
                rows.append(row)
                print({k: row[k] for k in ("backend", "shape", "runtime",
                                           "ms", "conv_over")}, flush=True)
    common.write_child_output(
        args.child, rows, threads=args.threads or "backend default"
    )


def _cell(key, variant, spec):
    def cell(row):
        value = row[key].get(variant)
        if value is None:
            return "failed" if variant in row.get("errors", {}) else "—"
        return format(value, spec)
    return cell


def columns(variants):
    result = [
        ("backend", "Backend", None),
        ("shape", "H x W x C_in x C_out", None),
        ("runtime", "Runtime", None),
        (_cell("ms", "conv2d", ".3f"), "Conv2D ms", None),
    ]
    for variant in variants:
        if variant == "conv2d":
            continue
        result += [
            (_cell("ms", variant, ".3f"), f"{LABELS[variant]} ms", None),
            (_cell("conv_over", variant, ".2f"),
             f"Conv2D / {LABELS[variant]}", None),
        ]
    result += [
        (lambda r: ", ".join(f"{v} {x:.2f}"
                             for v, x in r["multiply_adds_ratio"].items())
         or "—", "Multiply-adds ratio (Conv2D / MIDL)", None),
        *common.LOAD_COLUMNS,
    ]
    return result


def write(outputs, args):
    rows, metadata = common.combined_outputs(outputs)
    metadata["load_average_after"] = load_average()
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, args.name)
    settings = {"k_ratio": K_RATIO, "repeats": args.repeats,
                "threads": args.threads,
                "variants": {v: VARIANTS[v] for v in args.variants},
                "export_variants": list(args.export_variants),
                "export_shapes": [shape_name(s) for s in args.export_shapes]}
    common.write_json(stem + ".json", rows, metadata, settings=settings)
    notes = [
        f"Batch 1, medians of {args.repeats} interleaved rounds, "
        f"{args.threads or 'the backends’ default'} thread(s) per backend. "
        f"MIDLConv2D: k_ratio {K_RATIO}, the layer's default rank, light "
        "path low-rank. Runtimes: `keras` is `model(x)` (eager; on PyTorch "
        "under `torch.no_grad()`); `predict_on_batch` is "
        "`model.predict_on_batch(x)` (a compiled trace on TensorFlow and "
        "JAX, eager on PyTorch); `tf_saved_model` is `model.export(..., "
        "format=\"tf_saved_model\")` with a static batch of 1 (JAX: "
        "jax2tf), reloaded with `tf.saved_model.load` and called as "
        "`serve(x)`; `onnxruntime` is `model.export(..., format=\"onnx\")` "
        "served by `onnxruntime.InferenceSession` with one intra-op thread. "
        "Conv2D / X: Conv2D's time over X's in the same runtime (above 1: "
        "X is faster). Multiply-adds ratio: Conv2D's over the MIDL layer's "
        "(gate and light path included), the speed-up at equal speed per "
        "multiply-add. 'failed': the export or its reload failed; the "
        "error is below.",
    ]
    failures = [
        f"* {row['backend']}, {row['shape']}, {row['runtime']}, {variant}: "
        f"`{' '.join(text.split())[:600]}`"
        for row in rows for variant, text in row["errors"].items()
    ]
    if failures:
        notes += ["", "Export failures (full text in the JSON file):", "",
                  *failures]
    differences = [
        f"{row['backend']} {row['shape']} {row['runtime']} {variant} "
        f"{value:.1e}"
        for row in rows
        for variant, value in row["max_abs_difference"].items()
    ]
    if differences:
        notes += ["", "Served output vs `model(x)`, max abs difference: "
                  + "; ".join(differences) + "."]
    operators = [
        f"* {row['backend']}, {row['shape']}, {variant}: " + ", ".join(
            f"{op} {count}" for op, count in counts.items())
        for row in rows for variant, counts in row["onnx_operators"].items()
    ]
    if operators:
        notes += ["", "ONNX graphs, operators (the gathered path gathers "
                  "the selected filters per example):", "", *operators]
    common.write_markdown(
        stem + ".md", rows, metadata, columns(args.variants),
        title="Batch-1 latency: MIDLConv2D vs Conv2D", notes=notes,
    )
    print(f"Wrote {stem}.json and {stem}.md")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--shapes", type=parse_shape, nargs="+",
                        default=[parse_shape(s) for s in SHAPES],
                        metavar="HxWxC_INxC_OUT",
                        help="layer shapes (default: %(default)s); issue "
                        f"23's table: {' '.join(ISSUE_SHAPES)}")
    parser.add_argument("--export-shapes", type=parse_shape, nargs="*",
                        default=None, metavar="HxWxC_INxC_OUT",
                        help="shapes also exported and served (default: "
                        "the first of --shapes; none with no value)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--export-variants", nargs="*",
                        default=list(EXPORT_VARIANTS),
                        choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per backend; 0: the backends' default")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--name", default="latency_conv")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if "conv2d" not in args.variants:
        parser.error("--variants must include conv2d (the baseline)")
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    if args.export_shapes is None:
        args.export_shapes = args.shapes[:1]
    return args


def child_arguments(args):
    """The command-line arguments that give a child the same settings."""
    arguments = ["--repeats", str(args.repeats), "--threads",
                 str(args.threads), "--shapes",
                 *map(shape_name, args.shapes), "--variants", *args.variants,
                 "--export-variants", *args.export_variants,
                 "--export-shapes", *map(shape_name, args.export_shapes)]
    return arguments


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    outputs = common.run_backends("benchmarks.latency_conv", args.backends,
                                  child_arguments(args), args.threads)
    write(outputs, args)


if __name__ == "__main__":
    main()
