"""Training-step and large-batch inference cost of MIDL against Dense.

Per backend (one child process each, `KERAS_BACKEND` being fixed per
process), one thread by default (`--threads`; the child is pinned to as
many CPUs, which is what bounds JAX, see `common.child_cpus`), Dense and
MIDL interleaved in one round robin after a warm-up, `--repeats` rounds,
medians:

* `train_on_batch` of the MLPs 784-1024-1024-10 at batch 256 and
  784-512-256-10 at batch 128 (ReLU hidden layers, Adam, sparse
  categorical cross-entropy). MIDL replaces both hidden layers, with its
  defaults and `k_ratio=0.45`. Keras compiles the step as it does by
  default on a CPU: `jax.jit` on JAX, `tf.function` without XLA on
  TensorFlow, eager on PyTorch.
* inference of one 4096 -> 4096 layer at batch 256, `layer(x)` inside the
  backend's compiled function as `predict` runs it (`jax.jit`,
  `tf.function`, eager under `torch.no_grad()`); MIDL on its masked
  path, the one that runs at this batch size.

Dense and MIDL store their kernels in different layouts (`(d, n)` and
`(n, d)`), and which layout's matmul is faster depends on the CPU and the
backend's matmul library: on the machine of the earlier committed runs
TensorFlow's matmul in MIDL's layout was 1.67x faster than `x @ W` at
this size, which made a masked MIDL (full matmul, gate and light path)
look faster than Dense. So each case also times the dense baseline in
MIDL's layout (`Dense, W^T layout`: the same matmul, no gate), and every
row reports `/ best dense`, its time over the faster of the two layouts:
that ratio is MIDL's own overhead, whatever the machine.

Every case also times `MIDL, second model`: MIDL built a second time
and timed in the same rounds, the same work as `MIDL`. Its ratio differs
from MIDL's by what two measurements of one thing differ by within a
run on this machine (model instances, their place in the round); read
the ratios with that spread.

`--profile` adds, to the 784-1024-1024-10 step, MIDL variants with parts
of the layer replaced, to attribute the cost (an ablation profile that
means the same on every backend):

* `fixed mask`: a constant mask with `k` ones per row instead of the
  gate's selection (the gate logits, the light path and the
  straight-through mix still run); its difference to MIDL is the cost of
  the selection;
* `fixed mask, plain mix`: also `mask * full + (1 - mask) * light` with
  no gradient to the gate; its difference to `fixed mask` is the
  straight-through estimator and the mix, forward and backward. What
  remains over Dense is the gate and light-path matmuls, their gradients,
  the balance loss and the optimizer's updates of their weights.
* `no balance loss`: MIDL with `balance_weight=0`: its difference to
  MIDL is the load-balancing loss (the selection frequencies and their
  gradient, which the mix takes to the logits).
* `rank 16`: MIDL with `rank=16` in place of the default rank (28 and 32
  for these layers): what half the gate and light-path work saves, a
  choice whose accuracy `benchmarks.paper_table` measures (recipe
  `rank=16`).

`--jit-compile` compiles the training steps with `jit_compile=True`,
Dense's and MIDL's alike (XLA on TensorFlow, which Keras does not use
on a CPU by default; `torch.compile` on PyTorch; JAX's steps are
XLA-compiled either way), and times the training steps only: what a
user gets from that one switch. Results go to `<name>_jit` files.

In each round every model runs one untimed step right before its timed
one (`SETTLE`): a training step follows a step of the same model, as in
a training loop. Timed right after another model's step, a step may pay
for the switch, and not every model follows the same kind of neighbour:
on JAX the first MIDL model, timed after the W^T Dense, measured
0.02-0.11 slower than the second, timed after the first, in all six
runs of commits 041ce17 and c10f164.

The 1-minute load average is read before and after each group of
timings. The timing loop rests as long as it works
(`common.interleaved_medians`), so the benchmark's own thread holds that
reading near 0.5 on a 2-core machine; a timing is evidence only if both
readings are at most 1 (`common.LOAD_LIMIT`); each group first waits
for the load to settle after its warm-up (`common.wait_for_quiet`). The
result files flag the others as not valid.

After the timings, every call runs 6 more times to count the process's
minor page faults per call (`common.page_faults`, median of the last 5):
where glibc's allocator gives large freed blocks back to the system
(PyTorch's tensors), a step maps and zeroes fresh pages again, a cost
that differs between processes with the allocator's state; the
allocator settings of the environment (`MALLOC_*_`) are part of the
recorded command (`common.command_line`).

Usage:

    python -m benchmarks.training_step --profile
    python -m benchmarks.training_step --backends jax --repeats 5
    python -m benchmarks.training_step --jit-compile
"""

import argparse

from benchmarks import common
from benchmarks import latency

BACKENDS = ("torch", "tensorflow", "jax")
MLPS = (((1024, 1024), 256), ((512, 256), 128))
INFERENCE = (4096, 256)
K_RATIO = 0.45
INPUT_DIM = 784
CLASSES = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS),
                        choices=BACKENDS)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per backend (0: the backends' "
                        "defaults)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="add the ablation variants of the MIDL step")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the training steps with "
                        "jit_compile=True (training rows only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--name", default="training_step",
                        help="stem of the result files")
    common.add_output_argument(parser)
    return parser.parse_args(argv)


# --- Child: one backend ---------------------------------------------------


def transposed_dense():
    """A Dense layer that stores its kernel as MIDL does, `(units, d)`,
    and multiplies it the way MIDL's full path does."""
    import keras

    from keras_midl import backend

    class DenseTransposed(keras.layers.Layer):
        def __init__(self, units, activation=None, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.activation = keras.activations.get(activation)

        def build(self, input_shape):
            self.kernel = self.add_weight(
                shape=(self.units, input_shape[-1]),
                initializer="glorot_uniform",
            )
            self.bias = self.add_weight(shape=(self.units,),
                                        initializer="zeros")

        def call(self, inputs, training=None):
            outputs = backend.current().matmul_transposed(
                inputs, self.kernel
            ) + self.bias
            return self.activation(outputs)

    return DenseTransposed


# Untimed steps of a model right before each timed one.
SETTLE = 1
BASELINES = ("Dense", "Dense, W^T layout")


# The control: MIDL built a second time and timed in the same rounds.
SECOND_MODEL = "MIDL, second model"


def profile_layers():
    """MIDL subclasses with parts replaced (see the module docstring)."""
    from keras import ops

    from keras_midl import MIDL
    from keras_midl.ops.selection import selection_frequencies

    class FixedMask(MIDL):
        def _select(self, logits, training):
            first_k = ops.cast(ops.arange(self.units) < self.k, logits.dtype)
            return ops.zeros_like(logits) + first_k

    class FixedMaskPlainMix(FixedMask):
        def _interpolate(
            self, mask, logits, full, light, return_frequencies, training
        ):
            gate = ops.cast(mask, full.dtype)
            full = full + self.bias
            light = light + self.light_bias
            outputs = gate * full + (1.0 - gate) * light
            if return_frequencies:
                soft = self._gate_probabilities(logits)
                return outputs, selection_frequencies(mask, soft)
            return outputs

    class Rank16(MIDL):
        def __init__(self, units, rank=16, **kwargs):
            super().__init__(units, rank=rank, **kwargs)

    class NoBalanceLoss(MIDL):
        def __init__(self, units, balance_weight=0.0, **kwargs):
            super().__init__(units, balance_weight=balance_weight, **kwargs)

    return {"fixed mask": FixedMask,
            "fixed mask, plain mix": FixedMaskPlainMix,
            "rank 16": Rank16,
            "no balance loss": NoBalanceLoss}


def timed_rows(calls, args, **labels):
    """Times `calls` interleaved (Dense among them); one row per call,
    with `labels`, its median, its ratio to Dense, the load average read
    before and after, and its page faults per call (`common.page_faults`,
    counted after the timings)."""
    for _ in range(args.warmup):
        for call in calls.values():
            common.block(call())
    before = common.wait_for_quiet()
    medians = common.interleaved_medians(
        calls, repeats=args.repeats, settle=SETTLE
    )
    after = common.load_average()
    faults = {name: common.page_faults(call) for name, call in calls.items()}
    best = min(medians[name] for name in BASELINES if name in medians)
    return [
        {
            **labels,
            "variant": name,
            "ms": 1e3 * seconds,
            "ratio_to_dense": seconds / medians["Dense"],
            "ratio_to_best_dense": seconds / best,
            "page_faults": faults[name],
            "load_before": before,
            "load_after": after,
        }
        for name, seconds in medians.items()
    ]


def mlp(hidden, layer_class=None, jit_compile="auto"):
    """An MLP 784-hidden-10; `layer_class=None` is Dense."""
    import keras

    layers = [keras.Input((INPUT_DIM,))]
    for units in hidden:
        if layer_class is None:
            layers.append(keras.layers.Dense(units, activation="relu"))
        elif not hasattr(layer_class, "k_ratio"):  # a dense baseline
            layers.append(layer_class(units, activation="relu"))
        else:
            layers.append(
                layer_class(units, k_ratio=K_RATIO, activation="relu")
            )
    layers.append(keras.layers.Dense(CLASSES))
    model = keras.Sequential(layers)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def training_rows(args):
    import keras
    import numpy as np

    from keras_midl import MIDL

    rows = []
    rng = np.random.default_rng(0)
    for hidden, batch in MLPS:
        keras.utils.set_random_seed(0)
        x = rng.random((batch, INPUT_DIM), dtype="float32")
        y = rng.integers(0, CLASSES, size=(batch,))
        variants = {
            "Dense": None,
            "Dense, W^T layout": transposed_dense(),
            "MIDL": MIDL,
            SECOND_MODEL: MIDL,
        }
        if args.profile and hidden == MLPS[0][0]:
            variants.update(profile_layers())
        jit_compile = True if args.jit_compile else "auto"
        models = {
            name: mlp(hidden, cls, jit_compile)
            for name, cls in variants.items()
        }
        calls = {
            name: (lambda m=model, x=x, y=y: m.train_on_batch(x, y))
            for name, model in models.items()
        }
        rows += timed_rows(
            calls,
            args,
            case="train_on_batch, jit_compile" if args.jit_compile
            else "train_on_batch",
            model="MLP 784-" + "-".join(map(str, hidden)) + "-10",
            batch=batch,
        )
    return rows


def inference_rows(args):
    import keras
    import numpy as np

    from keras_midl import MIDL

    units, batch = INFERENCE
    keras.utils.set_random_seed(0)
    x = keras.ops.convert_to_tensor(
        np.random.default_rng(0).random((batch, units), dtype="float32")
    )
    layers = {
        "Dense": keras.layers.Dense(units),
        "Dense, W^T layout": transposed_dense()(units),
        "MIDL": MIDL(units, k_ratio=K_RATIO, inference_path="masked"),
        SECOND_MODEL: MIDL(units, k_ratio=K_RATIO, inference_path="masked"),
    }
    calls = {}
    for name, layer in layers.items():
        layer.build((batch, units))
        forward = latency.forward_function(layer)
        calls[name] = lambda f=forward: f(x)
    return timed_rows(
        calls,
        args,
        case="inference (masked)",
        model=f"one {units} -> {units} layer",
        batch=batch,
    )


def child(args):
    rows = training_rows(args)
    if not args.jit_compile:
        rows += inference_rows(args)
    common.write_child_output(args.child, rows)


# --- Parent: one child per backend, then the result files -----------------


def run_children(args):
    settings = ["--threads", str(args.threads), "--repeats",
                str(args.repeats), "--warmup", str(args.warmup)]
    if args.profile:
        settings.append("--profile")
    if args.jit_compile:
        settings.append("--jit-compile")
    return common.run_backends(
        "benchmarks.training_step", args.backends, settings, args.threads
    )


TARGETS = {
    ("train_on_batch", "MLP 784-1024-1024-10"): 1.3,
    ("train_on_batch, jit_compile", "MLP 784-1024-1024-10"): 1.3,
    ("train_on_batch", "MLP 784-512-256-10"): 1.5,
    ("inference (masked)", "one 4096 -> 4096 layer"): 1.15,
}


def finish_rows(outputs, threads=1):
    rows = []
    for backend, output in outputs.items():
        for row in output["rows"]:
            loads = [row["load_before"], row["load_after"]]
            valid = common.load_valid(loads, threads)
            target = TARGETS.get((row["case"], row["model"]))
            met = None
            if row["variant"] == "MIDL" and target is not None:
                ratio = row["ratio_to_best_dense"]
                met = "yes" if ratio <= target else "no"
            rows.append({
                "backend": backend,
                **row,
                "target": target if row["variant"] == "MIDL" else None,
                "target_met": met,
                "valid": "yes" if valid else "no (load)",
            })
    return rows


COLUMNS = [
    ("backend", "Backend", None),
    ("case", "Case", None),
    ("model", "Model", None),
    ("batch", "Batch", None),
    ("variant", "Variant", None),
    ("ms", "Median ms", ".2f"),
    ("ratio_to_dense", "/ Dense", ".2f"),
    ("ratio_to_best_dense", "/ best dense", ".2f"),
    ("target", "Target", ".2f"),
    ("target_met", "Met", None),
    ("page_faults", "Page faults / call", ".0f"),
    ("load_before", "Load before", ".2f"),
    ("load_after", "Load after", ".2f"),
    ("valid", "Valid", None),
]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    metadata = common.environment()
    outputs = run_children(args)
    metadata["load_average_after"] = common.load_average()
    metadata["children"] = {
        backend: output["metadata"] for backend, output in outputs.items()
    }
    rows = finish_rows(outputs, args.threads)
    name = args.name + ("_jit" if args.jit_compile else "")
    stem = common.output_path(args.output, name)
    common.write_json(stem + ".json", rows, metadata,
                      settings={"threads": args.threads,
                                "repeats": args.repeats,
                                "warmup": args.warmup,
                                "jit_compile": args.jit_compile,
                                "k_ratio": K_RATIO})
    notes = [
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up "
        f"rounds, medians; each timed call right after {SETTLE} untimed "
        "call of the same model; "
        f"{args.threads or 'default'} thread(s) per backend, pinned to as "
        "many CPUs. `/ Dense`: the variant's median over Dense's, measured "
        "in the same rounds; `/ best dense`: over the faster of Dense and "
        "`Dense, W^T layout` (the same matmul in MIDL's kernel layout), "
        "MIDL's own overhead; targets apply to it. The timing loop "
        "rests as long as it works, so its own thread adds about 0.5 "
        f"to the load average; each group waits for the load to fall to "
        f"{common.QUIET_LOAD:g} after its warm-up. Valid: both load readings "
        f"at most {common.LOAD_LIMIT:g}. Page faults / call: the "
        "process's minor page faults per call, median of 5 calls after "
        "the timings (`common.page_faults`); every fault maps and zeroes "
        "a fresh 4 KiB page, which glibc's allocator makes a call pay "
        "again for each large temporary where it gives freed memory "
        "back to the system (see docs/inference_paths.md).",
        "Profile variants (`--profile`): `fixed mask` replaces the "
        "selection by a constant mask; `fixed mask, plain mix` also "
        "replaces the straight-through mix by a plain one with no "
        "gradient to the gate; `rank 16` is MIDL with `rank=16` in place "
        "of the default (28, 32); `no balance loss` is MIDL with "
        "`balance_weight=0` (see the module docstring). "
        "`MIDL, second model` (every case): MIDL built again and timed in "
        "the same rounds, the control: the spread between two "
        "measurements of the same work within a run.",
    ]
    common.write_markdown(stem + ".md", rows, metadata, COLUMNS,
                          title="Training step and large-batch inference: "
                          "MIDL / Dense", notes=notes)
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
