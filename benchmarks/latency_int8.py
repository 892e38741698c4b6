"""Small-batch CPU latency of int8 MIDL against float and int8 Dense.

Per backend (one child process each, `KERAS_BACKEND` being fixed per
process), for one square layer `d = n` in {1024, 4096, 8192} and batch in
{1, 2, 4, 8}, four one-layer `Sequential` models, all timed in one
interleaved round robin after warm-up (`--repeats` rounds, medians):

* float `keras.layers.Dense(n)`;
* Keras's int8 Dense: the same after `model.quantize("int8")`;
* float `keras_midl.MIDL(n, k_ratio=0.45, inference_path="auto")`;
* int8 MIDL: the same after `model.quantize("int8")`, where the native
  kernel reads the selected rows of the int8 kernel in place
  (`keras_midl.native.sparse_forward`).

Each is called as a user calls it: `model(x)` (on PyTorch under
`torch.no_grad()`) and `model.predict_on_batch(x)`. On TensorFlow and
JAX `predict_on_batch` runs a trace, where MIDL runs `keras.ops` only, so
there the int8 MIDL gets no native kernel (see
`keras_midl.ops.dispatch`); on PyTorch `predict_on_batch` is eager. On
TensorFlow and JAX a third call, `predict_on_batch` of copies of the
models compiled with `run_eagerly=True` (Keras's own switch; it turns
off `jit_compile` too), shows what a user who serves with `predict` gets
from that switch: an eager predict step, where the native kernel runs.

The ceiling, for the int8 MIDL at batch 1: it reads `k * d` bytes of the
int8 kernel and `4 * r * (d + 2n)` bytes of float gate and light path;
float Dense reads `4 * d * n`. At equal bytes per second the speed-up is
`4 d n / (k d + 4 r (d + 2 n))`, about 7x at d = n = 4096.

The load average is read before and after each group; a group is not
valid when either reading exceeds 1 per thread (`common.load_valid`).
Before its timings each group waits for the load to fall to 0.5 after
its warm-up (`common.wait_for_quiet`).

Usage:

    python -m benchmarks.latency_int8 --output benchmarks/results/latency
    python -m benchmarks.latency_int8 --backends torch --dims 4096 --batches 1

Writes `<name>.json` and `<name>.md` (default name `latency_int8`) under
`--output` (default: a folder in the system's temporary directory).
"""

import argparse
import os
import tempfile

import numpy as np

from benchmarks import common
from benchmarks.common import block
from benchmarks.common import interleaved_medians
from benchmarks.common import load_average

BACKENDS = ("tensorflow", "jax", "torch")
DIMS = (1024, 4096, 8192)
BATCHES = (1, 2, 4, 8)
K_RATIO = 0.45
MODELS = ("float Dense", "int8 Dense", "float MIDL", "int8 MIDL")
CALLS = ("model(x)", "predict_on_batch", "predict_on_batch, run_eagerly")
EAGER_PREDICT = "predict_on_batch, run_eagerly"
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_latency")


def ceiling(d, n, k, rank):
    """Float Dense bytes over int8 MIDL bytes (kernel rows, gate, light)."""
    return 4 * d * n / (k * d + 4 * rank * (d + 2 * n))


def build_models(d):
    import keras

    from keras_midl import MIDL

    def one_layer(layer):
        model = keras.Sequential([keras.Input((d,)), layer])
        model.build((None, d))
        return model

    keras.utils.set_random_seed(0)
    models = {
        "float Dense": one_layer(keras.layers.Dense(d)),
        "int8 Dense": one_layer(keras.layers.Dense(d)),
        "float MIDL": one_layer(
            MIDL(d, k_ratio=K_RATIO, inference_path="auto")
        ),
        "int8 MIDL": one_layer(
            MIDL(d, k_ratio=K_RATIO, inference_path="auto")
        ),
    }
    models["int8 Dense"].quantize("int8")
    models["int8 MIDL"].quantize("int8")
    return models


def eager_copies(models):
    """Copies of the models (same weights) compiled with
    `run_eagerly=True`: their `predict_on_batch` runs eagerly. `{}` on
    PyTorch, whose `predict_on_batch` is eager already."""
    import keras

    if keras.backend.backend() == "torch":
        return {}
    copies = {}
    for name, model in models.items():
        # A quantized layer's config holds its int8 policy: the clone
        # builds int8 weights.
        copy = keras.models.clone_model(model)
        copy.set_weights(model.get_weights())
        copy.compile(run_eagerly=True)
        copies[name] = copy
    return copies


def calls_of(models, x, eager_models=None):
    import keras

    calls = {}
    for name, model in (eager_models or {}).items():
        calls[(name, EAGER_PREDICT)] = (
            lambda model=model: model.predict_on_batch(x)
        )
    torch_backend = keras.backend.backend() == "torch"
    for name, model in models.items():
        if torch_backend:
            import torch

            def eager(model=model):
                with torch.no_grad():
                    return model(x)

        else:

            def eager(model=model):
                return model(x)

        calls[(name, "model(x)")] = eager
        calls[(name, "predict_on_batch")] = (
            lambda model=model: model.predict_on_batch(x)
        )
    return calls


def eager_path(model, batch):
    """What an eager call of the one-layer MIDL model runs under
    `inference_path="auto"` (`keras_midl.ops.dispatch`): the native
    kernel, or the masked path."""
    from keras_midl.ops import dispatch

    layer = model.layers[0]
    if dispatch.native_applies(layer) and dispatch.native_auto_gathers(
        layer, batch
    ):
        return "native"
    return "masked"


def traced_path(model, batch):
    """What a traced call (`predict_on_batch` on TensorFlow and JAX) of
    the one-layer MIDL model runs under `inference_path="auto"`: the
    `keras.ops` gathered path or the masked one."""
    from keras_midl.ops import dispatch

    if dispatch.traced_auto_gathers(model.layers[0], batch):
        return "keras.ops gathered (traced)"
    return "keras.ops masked (traced)"


def measure(d, batch, models, repeats, threads, eager_models=None):
    import keras
    from keras import ops

    x = ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(batch, d)), "float32"
    )
    calls = calls_of(models, x, eager_models)
    for call in calls.values():  # warm-up: traces, compiles, caches
        block(call())
        block(call())
    named = {f"{m} | {c}": call for (m, c), call in calls.items()}
    load_before = common.wait_for_quiet()
    medians = interleaved_medians(named, repeats=repeats)
    load_after = load_average()
    layer = models["float MIDL"].layers[0]
    rows = []
    for how in CALLS:
        if how == EAGER_PREDICT and not eager_models:
            continue
        ms = {m: medians[f"{m} | {how}"] * 1e3 for m in MODELS}
        rows.append({
            "backend": keras.backend.backend(),
            "threads": threads,
            "d": d,
            "batch": batch,
            "k_ratio": K_RATIO,
            "call": how,
            **{f"{m} ms": ms[m] for m in MODELS},
            "float Dense / int8 MIDL": ms["float Dense"] / ms["int8 MIDL"],
            "int8 Dense / int8 MIDL": ms["int8 Dense"] / ms["int8 MIDL"],
            "float Dense / float MIDL": ms["float Dense"] / ms["float MIDL"],
            "eager path (int8 MIDL)": eager_path(models["int8 MIDL"], batch),
            "traced path (int8 MIDL)": traced_path(
                models["int8 MIDL"], batch
            ),
            "ceiling": ceiling(d, d, layer.k, layer.effective_rank),
            "load_before": load_before,
            "load_after": load_after,
            "valid": common.load_valid((load_before, load_after), threads),
        })
    return rows


def child(args):
    import keras

    if args.threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    for d in args.dims:
        models = build_models(d)
        eager_models = eager_copies(models)
        for batch in args.batches:
            new_rows = measure(d, batch, models, args.repeats, args.threads,
                               eager_models)
            for row in new_rows:
                print(row, flush=True)
            rows.extend(new_rows)
        del models, eager_models
    common.write_child_output(
        args.child, rows, threads=args.threads or "backend default"
    )


COLUMNS = [
    ("backend", "Backend", None),
    ("d", "d = n", None),
    ("batch", "Batch", None),
    ("call", "Call", None),
    ("float Dense ms", "float Dense ms", ".3f"),
    ("int8 Dense ms", "Keras int8 Dense ms", ".3f"),
    ("float MIDL ms", "float MIDL ms", ".3f"),
    ("int8 MIDL ms", "int8 MIDL ms", ".3f"),
    ("float Dense / int8 MIDL", "float Dense / int8 MIDL", ".2f"),
    ("int8 Dense / int8 MIDL", "Keras int8 Dense / int8 MIDL", ".2f"),
    ("float Dense / float MIDL", "float Dense / float MIDL", ".2f"),
    ("ceiling", "Ceiling (bytes)", ".1f"),
    (lambda r: (r["traced path (int8 MIDL)"]
                if r["call"] == "predict_on_batch"
                and r["backend"] != "torch"
                else r["eager path (int8 MIDL)"]),
     "int8 MIDL runs", None),
    *common.LOAD_COLUMNS,
]


def write(outputs, args):
    rows, metadata = common.combined_outputs(outputs)
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, args.name)
    common.write_json(stem + ".json", rows, metadata)
    if args.threads == 1:
        threads = "one thread per backend, pinned to one CPU"
    elif args.threads:
        threads = f"{args.threads} threads per backend"
    else:
        threads = (
            "each backend's default threading (not pinned; the native "
            "kernel takes the backend's intra-op thread count)"
        )
    notes = [
        f"Medians of interleaved rounds, {threads}. MIDL: "
        f"k_ratio {K_RATIO}, the default rank, `inference_path=\"auto\"`. "
        "`model(x)` is eager (on PyTorch under `torch.no_grad()`): there "
        "the int8 MIDL runs the native int8 kernel. `predict_on_batch` is "
        "a trace on TensorFlow and JAX, where MIDL runs keras.ops only "
        "(no native kernel): the gathered path where "
        "`TRACED_INT8_AUTO_RULES` says so, else the masked path, whose "
        "int8 matmul is summed in float32 on TensorFlow and is XLA's "
        "int8 dot on JAX; on PyTorch it is eager. "
        "Ceiling: float "
        "Dense's bytes over the int8 MIDL's (the selected int8 rows plus "
        "the float gate and light path), the speed-up at equal bytes per "
        "second. Each group waits for the load average to fall to "
        f"{common.QUIET_LOAD:g} after its warm-up; valid: both readings at "
        "most 1 per thread.",
    ]
    common.write_markdown(
        stem + ".md", rows, metadata, COLUMNS,
        title="Small-batch latency: int8 MIDL vs float and int8 Dense",
        notes=notes,
    )
    print(f"Wrote {stem}.json and {stem}.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--dims", type=int, nargs="+", default=list(DIMS))
    parser.add_argument("--batches", type=int, nargs="+",
                        default=list(BATCHES))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per backend; 0: the backends' default")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--name", default="latency_int8")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    arguments = ["--repeats", str(args.repeats), "--threads",
                 str(args.threads), "--dims", *map(str, args.dims),
                 "--batches", *map(str, args.batches)]
    outputs = common.run_backends("benchmarks.latency_int8", args.backends,
                                  arguments, args.threads)
    write(outputs, args)


if __name__ == "__main__":
    main()
