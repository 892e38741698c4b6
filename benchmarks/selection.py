"""Cost of the top-k selection, per method and backend.

For each backend (one child process each, since `KERAS_BACKEND` is fixed per
process) this measures, interleaved in one run after warm-up:

* `topk_mask(scores, k, method)` for every method of
  `keras_midl.ops.selection.SELECTION_METHODS`, against the full-path matmul
  `x @ W` of the same layer (what Dense computes), for a few layer shapes;
  the selection's cost is reported as a fraction of that matmul;
* `bisection, ties checked first` and `bisection, ties checked first,
  blocks`: the bisection with `check_ties_first=True`, as the layer
  selects, then also in blocks of rows that stay in a core's cache
  (`rows_per_block=cache_sized_block(units)`), as the backends that
  compile the selection with XLA run it (TensorFlow, JAX; on PyTorch,
  eager, the blocks only add launches);
* `native`: the C selection (`keras_midl.native.kernels.topk_mask`, the
  same mask) as training runs it: eager on PyTorch, the TensorFlow op
  `MidlTopkMask` in a `tf.function` without XLA on TensorFlow (as
  Keras's `fit` on a CPU), an XLA FFI call under `jax.jit` on JAX;
* the training-step time of an MLP 784-512-256-10 with MIDL hidden layers
  (`k_ratio=0.45`), per method, against the same MLP with Dense layers,
  at batch 128 (`train_on_batch` with Keras's default compilation: XLA
  on JAX; on a CPU-only machine no XLA on TensorFlow, eager on PyTorch).
  Where the native selection runs in training (PyTorch, TensorFlow
  without XLA) every method's MIDL trains with it: their rows differ by
  noise only.

Each backend runs with `--threads` threads (default 1: the machine these
results come from has 2 cores shared with other jobs; 0: the backends'
defaults, where the native selection shares its rows among threads).
The selection and the matmul are compiled with XLA on TensorFlow
(`tf.function(jit_compile=True)`) and JAX (`jax.jit`), eager on PyTorch.
Timings are medians; only ratios measured in the same run are
compared (the machine is shared).

Usage:

    python -m benchmarks.selection                  # every backend
    python -m benchmarks.selection --backends torch --repeats 5

Writes `<name>.json` and `<name>.md` (`--name`, default `selection`) to
`--output` (default: a folder outside the repository; `--output
benchmarks/results/selection` updates the committed results).
"""

import argparse
import os

import numpy as np

from benchmarks import common

BACKENDS = ("tensorflow", "jax", "torch")
# (rows, input_dim, units): the MLP's first layer, a square layer at batch
# 256, and the 4096 layer of benchmarks/latency.py at batch 1 and 32.
SHAPES = ((128, 784, 512), (256, 1024, 1024), (1, 4096, 4096), (32, 4096, 4096))
K_RATIO = 0.45


def compiled(fn):
    """`fn` compiled with XLA (TensorFlow, JAX), or eager (PyTorch)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    if backend == "torch":
        import torch

        def no_grad(*args):
            with torch.no_grad():
                return fn(*args)

        return no_grad
    raise NotImplementedError(backend)


def native_selection(k):
    """The C selection as a training step calls it, or `None` where it
    does not run (the library or JAX's FFI handler not built)."""
    import keras

    from keras_midl import backend as backends
    from keras_midl import native
    from keras_midl.ops import dispatch

    backend = keras.backend.backend()
    if not native.available():
        return None
    select = lambda s: dispatch.training_topk_mask(s, k, "top_k")  # noqa: E731
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(select)
    if backend == "jax":
        import jax

        if not backends.current()._ffi_selection_ready():
            return None
        return jax.jit(select)
    return select


def selection_rows(repeats):
    rows = []
    for batch, input_dim, units in SHAPES:
        rows.extend(measure_selection(batch, input_dim, units, repeats))
        print(rows[-2:], flush=True)
    return rows


def measure_selection(batch, input_dim, units, repeats):
    """Rows for one layer shape: each method against the matmul."""
    import keras
    from keras import ops

    from keras_midl.ops.selection import SELECTION_METHODS
    from keras_midl.ops.selection import cache_sized_block
    from keras_midl.ops.selection import topk_mask

    rng = np.random.default_rng(0)
    k = max(1, int(K_RATIO * units + 0.5))
    x = ops.convert_to_tensor(rng.normal(size=(batch, input_dim)), "float32")
    kernel = keras.Variable(
        rng.normal(size=(input_dim, units)).astype("float32")
    )
    scores = ops.convert_to_tensor(rng.normal(size=(batch, units)), "float32")
    matmul = compiled(lambda x: ops.matmul(x, kernel))
    candidates = {"matmul": lambda: matmul(x)}
    for method in SELECTION_METHODS:
        select = compiled(lambda s, m=method: topk_mask(s, k, method=m))
        candidates[method] = lambda select=select: select(scores)
    variants = {
        "bisection, ties checked first": None,
        "bisection, ties checked first, blocks": cache_sized_block(units),
    }
    for name, rows_per_block in variants.items():
        select = compiled(
            lambda s, rows=rows_per_block: topk_mask(
                s, k, "bisection", check_ties_first=True, rows_per_block=rows
            )
        )
        candidates[name] = lambda select=select: select(scores)
    methods = [*SELECTION_METHODS, *variants]
    native = native_selection(k)
    if native is not None:
        candidates["native"] = lambda: native(scores)
        methods.append("native")
    medians = common.interleaved_medians(candidates, warmup=2, repeats=repeats)
    return [
        {
            "kind": "selection",
            "backend": keras.backend.backend(),
            "method": method,
            "batch": batch,
            "input_dim": input_dim,
            "units": units,
            "k": k,
            "selection_ms": medians[method] * 1e3,
            "matmul_ms": medians["matmul"] * 1e3,
            "fraction_of_matmul": medians[method] / medians["matmul"],
        }
        for method in methods
    ]


def mlp(layer_factory):
    import keras

    return keras.Sequential(
        [
            keras.Input((784,)),
            layer_factory(512),
            layer_factory(256),
            keras.layers.Dense(10),
        ]
    )


def training_rows(repeats):
    import keras

    from keras_midl import MIDL
    from keras_midl.ops.selection import SELECTION_METHODS

    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 784)).astype("float32")
    y = rng.integers(0, 10, size=(128,))
    models = {"dense": mlp(lambda n: keras.layers.Dense(n, activation="relu"))}
    for method in SELECTION_METHODS:
        models[method] = mlp(
            lambda n, m=method: MIDL(
                n, k_ratio=K_RATIO, activation="relu", selection=m
            )
        )
    for model in models.values():
        model.compile(
            "adam",
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    candidates = {
        name: (lambda model=model: model.train_on_batch(x, y))
        for name, model in models.items()
    }
    medians = common.interleaved_medians(
        candidates, warmup=3, repeats=repeats * 2
    )
    return [
        {
            "kind": "training",
            "backend": keras.backend.backend(),
            "method": method,
            "batch": 128,
            "dense_step_ms": medians["dense"] * 1e3,
            "midl_step_ms": medians[method] * 1e3,
            "train_step_ratio": medians[method] / medians["dense"],
            "jit_compile": models[method].jit_compile,
        }
        for method in SELECTION_METHODS
    ]


def child(path, repeats):
    set_threads()
    rows = selection_rows(repeats) + training_rows(repeats)
    common.write_child_output(
        path, rows, threads=os.environ.get("OMP_NUM_THREADS")
    )


def set_threads():
    """Applies OMP_NUM_THREADS to PyTorch, which also reads its own setting."""
    import keras

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(int(threads))


def fastest(rows):
    """Per backend, the method with the lowest MLP training-step time."""
    best = {}
    for row in rows:
        if row["kind"] != "training":
            continue
        current = best.get(row["backend"])
        if current is None or row["midl_step_ms"] < current["midl_step_ms"]:
            best[row["backend"]] = row
    return {backend: row["method"] for backend, row in best.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per backend (0: the backends' "
                        "defaults)")
    parser.add_argument("--name", default="selection",
                        help="stem of the result files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    common.add_output_argument(parser)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.repeats)
        return
    load_before = common.load_average()
    repeats = ["--repeats", str(args.repeats)]
    outputs = common.run_backends(
        __spec__.name, args.backends, repeats, args.threads
    )
    rows, metadata = common.combined_outputs(outputs, backend_note="")
    metadata["load_average"] = load_before
    metadata["load_average_after"] = common.load_average()
    choice = fastest(rows)
    common.write_json(
        common.output_path(args.output, f"{args.name}.json"),
        rows,
        metadata,
        k_ratio=K_RATIO,
        fastest_selection=choice,
    )
    selection = [row for row in rows if row["kind"] == "selection"]
    training = [row for row in rows if row["kind"] == "training"]
    shape = lambda row: f"{row['batch']}x{row['input_dim']} @ {row['units']}"  # noqa: E731
    path = common.output_path(args.output, f"{args.name}.md")
    common.write_markdown(
        path,
        selection,
        metadata,
        title="Selection cost (top-k mask), k_ratio 0.45",
        columns=[
            ("backend", "Backend", None),
            ("method", "Method", None),
            (shape, "x @ W shape", None),
            ("k", "k", None),
            ("selection_ms", "Selection (ms)", ".3f"),
            ("matmul_ms", "Matmul (ms)", ".3f"),
            ("fraction_of_matmul", "Selection / matmul", ".2f"),
        ],
    )
    with open(path, "a") as file:
        file.write(
            "\n## MLP 784-512-256-10 training step, batch 128\n\n"
            + common.markdown_table(
                training,
                [
                    ("backend", "Backend", None),
                    ("method", "Method", None),
                    ("dense_step_ms", "Dense step (ms)", ".1f"),
                    ("midl_step_ms", "MIDL step (ms)", ".1f"),
                    ("train_step_ratio", "MIDL / Dense", ".2f"),
                    ("jit_compile", "XLA", None),
                ],
            )
            + f"\n\nFastest method per backend (MLP step): {choice}. "
            "Where the native selection runs in training (the C kernel "
            "on PyTorch and TensorFlow, the XLA FFI call on JAX) every "
            "method trains with it, so these rows differ by noise only; "
            "`selection` matters where it does not run (no compiler, a "
            "GPU, `jit_compile=True` on TensorFlow).\n"
        )
    print(open(path).read())


if __name__ == "__main__":
    main()
