"""What bounds int8 MIDL at batch 1: Keras's call and the kernel's reads.

Issue 22 asks `model(x)` of one int8 MIDL layer (d = n = 4096, k_ratio
0.45, batch 1, one thread) to take at most float Dense's time / 3.5, in
the setting of `benchmarks/latency_int8.py`: the four models of its table
called in turn. This benchmark measures, per backend (one child process
each), in one interleaved round robin (`common.interleaved_medians`,
medians), those four models' `model(x)`:

* `float Dense`, `int8 Dense` (Keras's, after `quantize("int8")`),
  `float MIDL` and `int8 MIDL` (native int8 kernel,
  `inference_path="auto"`), one-layer `Sequential` models;

and three more calls that take the int8 MIDL apart:

* `MIDL.call`: the same layer's `call(x)`, without Keras's
  `Layer.__call__` and the model around it: keras_midl's dispatch, the
  reads of the weights and the kernel;
* `kernel`: the native kernel alone (`keras_midl.native.sparse_forward`
  on NumPy views of the layer's own weights, so that it reads the same
  memory);
* `empty model`: `model(x)` of a one-layer `Sequential` model whose layer
  returns its input (`keras.layers.Identity`): what Keras itself costs
  per call.

The calls run in turn (`ORDER`), so that each part of the int8 MIDL
finds its weights evicted, as `int8 MIDL` does after `float MIDL` in
`benchmarks/latency_int8.py` (float Dense reads 64 MiB per call, Keras's
int8 Dense 16, the float MIDL about 30): `kernel` runs after float
Dense, `MIDL.call` after Keras's int8 Dense. (The first version of
this benchmark ran the kernel right after two other reads of the same
weights: 0.60-0.61 ms at commit 909427e, against 0.99-1.11 ms as the
first reader after float Dense at 218bffd; it understated the floor.)
The floor of `int8 MIDL` is `empty model + kernel`: Keras's call plus the
kernel's work, with nothing of keras_midl's own Python. `float Dense /
floor` is then the most any implementation behind Keras's `model(x)`
can reach here; where it is below the target, the target is out of reach
on this machine.

On PyTorch every call runs under `torch.no_grad()`, as a user serves.

Usage:

    python -m benchmarks.int8_floor --output benchmarks/results/latency

Writes `int8_floor.json` and `int8_floor.md` under `--output` (default: a
folder in the system's temporary directory).
"""

import argparse
import contextlib
import os
import tempfile

import numpy as np

from benchmarks import common
from benchmarks import latency_int8

BACKENDS = ("tensorflow", "jax", "torch")
MODELS = latency_int8.MODELS
CALLS = (*MODELS, "MIDL.call", "kernel", "empty model")
# The order of the calls in each round (see the module docstring).
ORDER = (
    "float Dense",
    "kernel",
    "int8 Dense",
    "MIDL.call",
    "float MIDL",
    "int8 MIDL",
    "empty model",
)
K_RATIO = latency_int8.K_RATIO
TARGET = 3.5
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_latency")


def build(d):
    """The four models of `latency_int8` (a dict, the same weights) and
    the empty one."""
    import keras

    models = latency_int8.build_models(d)
    empty = keras.Sequential([keras.Input((d,)), keras.layers.Identity()])
    empty.build((None, d))
    return models, empty


def weight_views(layer):
    """NumPy views (no copies) of the tensors the native kernel reads."""
    import keras

    from keras_midl.ops import dispatch

    views = {}
    for name, value in dispatch.layer_weights(layer).items():
        if value is None:
            views[name] = None
        elif keras.backend.backend() == "torch":
            views[name] = value.detach().numpy()
        elif keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            # A read of the variable, whose buffer the view keeps alive.
            views[name] = np.asarray(tf.convert_to_tensor(value))
        else:
            views[name] = np.asarray(value)
    return views


def calls_of(models, empty, x):
    """The timed callables (see the module docstring)."""
    import keras

    from keras_midl import native
    from keras_midl.ops import dispatch

    layer = models["int8 MIDL"].layers[0]
    if not dispatch.native_applies(layer):
        raise RuntimeError(
            "The native int8 kernel does not run here (no C compiler, or "
            "native kernels disabled): nothing to bound."
        )
    arrays = weight_views(layer)
    rows = keras.ops.convert_to_numpy(x)
    if keras.backend.backend() == "torch":
        import torch

        context = torch.no_grad
    else:
        context = contextlib.nullcontext

    def run(function):
        def call():
            with context():
                return function()

        return call

    calls = {
        name: run(lambda model=model: model(x))
        for name, model in models.items()
    }
    calls.update({
        "MIDL.call": run(lambda: layer.call(x)),
        "kernel": run(lambda: native.sparse_forward(rows, arrays, layer.k)),
        "empty model": run(lambda: empty(x)),
    })
    return {name: calls[name] for name in ORDER}


def measure(d, repeats):
    """The row of one backend: the five medians and what follows."""
    import keras

    models, empty = build(d)
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(1).normal(size=(1, d)), "float32"
    )
    calls = calls_of(models, empty, x)
    for call in calls.values():  # warm-up: builds, caches
        for _ in range(3):
            common.block(call())
    # The C kernel computes what the layer computes.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(calls["int8 MIDL"]()),
        calls["kernel"]()[0],
        rtol=1e-6,
        atol=1e-6,
    )
    load_before = common.wait_for_quiet()
    medians = common.interleaved_medians(calls, repeats=repeats)
    load_after = common.load_average()
    ms = {name: 1e3 * medians[name] for name in CALLS}
    floor = ms["empty model"] + ms["kernel"]
    row = {
        "backend": keras.backend.backend(),
        "d": d,
        "batch": 1,
        "k_ratio": K_RATIO,
        **{f"{name} ms": ms[name] for name in CALLS},
        "floor ms": floor,
        "target ms": ms["float Dense"] / TARGET,
        "float Dense / int8 MIDL": ms["float Dense"] / ms["int8 MIDL"],
        "int8 Dense / int8 MIDL": ms["int8 Dense"] / ms["int8 MIDL"],
        "float Dense / floor": ms["float Dense"] / floor,
        "Keras call ms": ms["int8 MIDL"] - ms["MIDL.call"],
        "keras_midl Python ms": ms["MIDL.call"] - ms["kernel"],
        "load_before": load_before,
        "load_after": load_after,
        "valid": common.load_valid((load_before, load_after), 1),
    }
    return row


def child(args):
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    row = measure(args.d, args.repeats)
    print(row, flush=True)
    common.write_child_output(args.child, [row], threads=1)


COLUMNS = [
    ("backend", "Backend", None),
    ("float Dense ms", "float Dense", ".3f"),
    ("int8 Dense ms", "Keras int8 Dense", ".3f"),
    ("float MIDL ms", "float MIDL", ".3f"),
    ("int8 MIDL ms", "int8 MIDL", ".3f"),
    ("MIDL.call ms", "MIDL.call", ".3f"),
    ("kernel ms", "kernel", ".3f"),
    ("empty model ms", "empty model", ".3f"),
    ("floor ms", "floor (empty + kernel)", ".3f"),
    ("target ms", f"target (Dense / {TARGET:g})", ".3f"),
    ("float Dense / int8 MIDL", "Dense / int8 MIDL", ".2f"),
    ("int8 Dense / int8 MIDL", "int8 Dense / int8 MIDL", ".2f"),
    ("float Dense / floor", "Dense / floor", ".2f"),
    *common.LOAD_COLUMNS,
]


def write(outputs, args):
    rows, metadata = common.combined_outputs(outputs)
    os.makedirs(args.output, exist_ok=True)
    stem = os.path.join(args.output, "int8_floor")
    common.write_json(stem + ".json", rows, metadata)
    notes = [
        f"Milliseconds, medians of {args.repeats} interleaved rounds, one "
        f"thread, d = n = {args.d}, batch 1, MIDL k_ratio {K_RATIO} (int8, "
        "native kernel). Floor: `empty model` (Keras's own `model(x)`) + "
        "`kernel` (the native kernel alone); `Dense / floor` is the most "
        "any implementation behind `model(x)` reaches here. The target "
        f"of issue 22 is `Dense / int8 MIDL >= {TARGET:g}`. Each backend "
        f"waits for the load average to fall to {common.QUIET_LOAD:g} "
        "after its warm-up; valid: both readings at most 1.",
    ]
    common.write_markdown(
        stem + ".md", rows, metadata, COLUMNS,
        title="int8 MIDL at batch 1: what bounds it", notes=notes,
    )
    print(f"Wrote {stem}.json and {stem}.md")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    arguments = ["--repeats", str(args.repeats), "--d", str(args.d)]
    outputs = common.run_backends("benchmarks.int8_floor", args.backends,
                                  arguments, 1)
    write(outputs, args)


if __name__ == "__main__":
    main()
