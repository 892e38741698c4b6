"""Memory of repeated `fit` / `predict` calls in one process.

For each backend and model (one child process each, since `KERAS_BACKEND`
is fixed per process), this builds a small MLP, warms it up, then makes
`--calls` alternating `fit` (one epoch of 4 batches) and `predict` calls
and samples the process's resident set size (RSS, from
`/proc/self/status`, `psutil` elsewhere) every 20 calls. A model with MIDL
hidden layers is measured next to the same MLP with Dense layers, so that
growth caused by MIDL can be told apart from the backend's own.

Reported per backend and model: RSS after warm-up, growth over all calls,
growth over the second half (a leak keeps growing; allocator and cache
warm-up levels off) and the growth per call. The check: growth after
warm-up stays under `--bound-mib` (default 64 MiB).

Usage:

    python -m benchmarks.memory                     # every backend
    python -m benchmarks.memory --backends jax --calls 100

Writes `memory.json` and `memory.md` to `--output` (default: a folder
outside the repository; `--output benchmarks/results/memory` updates
the committed results).
"""

import argparse
import json
import os
import subprocess
import sys

from benchmarks import common

BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("midl", "dense")
SAMPLE_EVERY = 20


def rss_mib():
    """Resident set size of this process in MiB."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _child(model_kind, calls, warmup):
    import keras
    import numpy as np

    from keras_midl import MIDL

    keras.utils.set_random_seed(0)
    if model_kind == "midl":
        hidden = [
            MIDL(128, k_ratio=0.45, activation="relu"),
            MIDL(64, k_ratio=0.45, activation="relu"),
        ]
    else:
        hidden = [
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(64, activation="relu"),
        ]
    model = keras.Sequential(
        [keras.Input((64,)), *hidden, keras.layers.Dense(10)]
    )
    model.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype("float32")
    y = rng.integers(0, 10, size=256)

    def one_call(i):
        if i % 2 == 0:
            model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        else:
            model.predict(x[:64], batch_size=64, verbose=0)

    for i in range(warmup):
        one_call(i)
    samples = [(0, rss_mib())]
    for i in range(1, calls + 1):
        one_call(i)
        if i % SAMPLE_EVERY == 0:
            samples.append((i, rss_mib()))
    return samples


def _summary(backend, model_kind, samples, bound):
    start = samples[0][1]
    middle = min(samples, key=lambda s: abs(s[0] - samples[-1][0] / 2))[1]
    end = samples[-1][1]
    calls = samples[-1][0]
    return {
        "backend": backend,
        "model": model_kind,
        "calls": calls,
        "rss_after_warmup_mib": start,
        "growth_mib": end - start,
        "second_half_growth_mib": end - middle,
        "growth_per_call_kib": 1024 * (end - start) / calls,
        "max_rss_mib": max(rss for _, rss in samples),
        "within_bound": end - start < bound,
        "samples": samples,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--bound-mib", type=float, default=64.0)
    parser.add_argument("--child", nargs=2, metavar=("BACKEND", "MODEL"))
    common.add_output_argument(parser)
    args = parser.parse_args()

    if args.child:
        samples = _child(args.child[1], args.calls, args.warmup)
        print("SAMPLES" + json.dumps(samples))
        return

    load_before = common.load_average()
    rows = []
    for backend in args.backends:
        for model_kind in MODELS:
            print(f"{backend} / {model_kind} ...", flush=True)
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    __spec__.name,
                    "--child",
                    backend,
                    model_kind,
                    "--calls",
                    str(args.calls),
                    "--warmup",
                    str(args.warmup),
                ],
                env={
                    **os.environ,
                    "KERAS_BACKEND": backend,
                    "TF_CPP_MIN_LOG_LEVEL": "3",
                },
                cwd=common.ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [
                line
                for line in completed.stdout.splitlines()
                if line.startswith("SAMPLES")
            ]
            if completed.returncode != 0 or not lines:
                sys.exit(completed.stderr[-4000:])
            samples = json.loads(lines[-1][len("SAMPLES") :])
            row = _summary(backend, model_kind, samples, args.bound_mib)
            rows.append(row)
            print(
                f"  RSS {row['rss_after_warmup_mib']:.0f} MiB after warm-up, "
                f"{row['growth_mib']:+.1f} MiB over {row['calls']} calls",
                flush=True,
            )

    metadata = common.environment()
    metadata["load_average"] = load_before
    metadata["load_average_after"] = common.load_average()
    metadata["backend"] = ", ".join(args.backends)
    metadata["threads"] = "backend default"
    common.write_json(
        common.output_path(args.output, "memory.json"),
        rows,
        metadata,
        calls=args.calls,
        warmup=args.warmup,
        bound_mib=args.bound_mib,
    )
    common.write_markdown(
        common.output_path(args.output, "memory.md"),
        rows,
        metadata,
        title=(
            f"Memory over {args.calls} alternating fit/predict calls "
            f"(after {args.warmup} warm-up calls)"
        ),
        columns=[
            ("backend", "Backend", None),
            ("model", "Model", None),
            ("rss_after_warmup_mib", "RSS after warm-up (MiB)", ".0f"),
            ("growth_mib", "Growth (MiB)", "+.1f"),
            ("second_half_growth_mib", "Growth, 2nd half (MiB)", "+.1f"),
            ("growth_per_call_kib", "Per call (KiB)", "+.1f"),
            ("within_bound", f"< {args.bound_mib:g} MiB", None),
        ],
        notes=[
            "MLP 64-128-64-10 (MIDL k_ratio 0.45, or Dense), Adam; one call "
            "is `fit` (1 epoch, 256 rows, batch 64) or `predict` (64 rows), "
            "alternating. RSS from /proc/self/status, sampled every "
            f"{SAMPLE_EVERY} calls; one process per backend and model."
        ],
    )


if __name__ == "__main__":
    main()
