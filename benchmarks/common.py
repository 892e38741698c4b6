"""Helpers shared by the benchmark scripts: metadata, result files, progress.

Every result file records what produced it (`environment()`): the command,
the Keras backend, library versions, the machine, the date and the load
average. Results are written twice: a JSON file for machines
(`write_json`) and a Markdown table for the README (`write_markdown`).

Results go to the folder given by `--output` (`add_output_argument`),
by default `DEFAULT_OUTPUT`, outside the repository: the committed results
of a benchmark, in `benchmarks/results/<benchmark>/`, change only with
`--output benchmarks/results/<benchmark>`.

Example (from the repository root):

>>> import argparse
>>> from benchmarks import common
>>> parser = argparse.ArgumentParser()
>>> common.add_output_argument(parser)
>>> args = parser.parse_args([])
>>> meta = common.environment()
>>> rows = [{"dataset": "mnist", "acc": 0.981}]
>>> common.write_json(common.output_path(args.output, "x.json"), rows, meta)
>>> common.write_markdown(
...     common.output_path(args.output, "x.md"), rows, meta, title="X",
...     columns=[("dataset", "Dataset", None), ("acc", "Accuracy", ".3f")],
... )
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

# The repository root: the working folder of `python -m benchmarks.<name>`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The committed results, one folder per benchmark (`<RESULTS_DIR>/latency`,
# ...), rewritten only when `--output` names one of them.
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
# Where results go by default: outside the repository.
DEFAULT_OUTPUT = os.path.join(tempfile.gettempdir(), "keras_midl_results")

_PACKAGES = (
    "keras",
    "keras-midl",
    "numpy",
    "tensorflow",
    "tensorflow-cpu",
    "jax",
    "jaxlib",
    "torch",
    "tensorflow-datasets",
    "keras-tuner",
    "scikit-learn",
)


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*arguments):
    """`git <arguments>`'s output in this checkout, or `None`."""
    try:
        result = subprocess.run(
            ["git", *arguments],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def _git_commit():
    commit = _git("rev-parse", "--short", "HEAD") or None
    if commit and _tracked_changes():
        commit += " + uncommitted changes"
    return commit


# Tracked paths whose changes do not change what a benchmark measures:
# results (a queue of runs writes them one after the other) and prose.
UNMEASURED_PATHS = ("benchmarks/results/", "docs/")
UNMEASURED_SUFFIXES = (".md",)


def _tracked_changes():
    """Whether tracked files that a measurement depends on differ from
    HEAD (a result measured then is not exactly the commit's): every
    tracked file but results and prose (`UNMEASURED_PATHS`,
    `UNMEASURED_SUFFIXES`)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    # `_git` strips the output, and with it the first line's leading
    # space (" M path"): the path is what follows the status letters.
    return any(
        not _unmeasured(line.split(None, 1)[1].split(" -> ")[-1].strip('"'))
        for line in (status or "").splitlines()
        if line.strip()
    )


def _unmeasured(path):
    return path.startswith(UNMEASURED_PATHS) or path.endswith(
        UNMEASURED_SUFFIXES
    )


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# Environment variables that change a timing from outside the script:
# glibc's allocator settings (`MALLOC_*_`, `GLIBC_TUNABLES`) and an
# allocator swapped in by `LD_PRELOAD` (jemalloc, tcmalloc). They decide
# how many page faults a PyTorch step pays (docs/inference_paths.md).
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD")
ALLOCATOR_PREFIX = "MALLOC_"


def _allocator_environment():
    """The allocator settings of this process's environment, sorted."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if name in ALLOCATOR_VARIABLES or name.startswith(ALLOCATOR_PREFIX)
    }


def command_line():
    """The command that started this process, as a copyable shell string.

    `python -m benchmarks.<name> ...` for a module run with `-m`, else
    `python <script> ...`; prefixed with `KERAS_BACKEND=...` when set,
    then with the allocator settings that are set
    (`ALLOCATOR_VARIABLES`, `MALLOC_*`).
    """
    backend = os.environ.get("KERAS_BACKEND")
    prefix = f"KERAS_BACKEND={backend} " if backend else ""
    prefix += "".join(
        f"{name}={shlex.quote(value)} "
        for name, value in _allocator_environment().items()
    )
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        script = f"-m {spec.name.removesuffix('.__main__')}"
    else:
        script = os.path.relpath(sys.argv[0]) if sys.argv else ""
    arguments = " ".join(shlex.quote(arg) for arg in sys.argv[1:])
    return f"{prefix}python {script} {arguments}".strip()


def load_average():
    """The 1-minute load average, or `None` where it cannot be read."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# A timing is evidence only if the 1-minute load average read before and
# after it is at most this, per thread the benchmark runs (the project's
# standard on its 2-core machines; `load_limit`).
LOAD_LIMIT = 1.0
# Before each group of timings, `wait_for_quiet` waits for the load to
# fall to this: the group's warm-up (compilation, building models) keeps
# a core busy and lifts it.
QUIET_LOAD = 0.5
# How long it waits at most, in seconds. The environment variable
# `QUIET_TIMEOUT_ENV` overrides it, in child processes too: the harness
# tests set 0, as they time nothing that is reported.
QUIET_TIMEOUT = 180.0
QUIET_TIMEOUT_ENV = "KERAS_MIDL_BENCH_QUIET_TIMEOUT"


def load_limit(threads):
    """The highest load average at which a timing on `threads` threads is
    evidence: `LOAD_LIMIT` per thread (`threads=0`, the backends' default
    threading, counts every CPU)."""
    return LOAD_LIMIT * max(threads or os.cpu_count() or 1, 1)


def load_valid(loads, threads=1):
    """Whether every reading in `loads` is known and at most
    `load_limit(threads)`."""
    limit = load_limit(threads)
    return all(load is not None and load <= limit for load in loads)


def quiet_timeout():
    """`QUIET_TIMEOUT`, or the seconds set in `$KERAS_MIDL_BENCH_QUIET_TIMEOUT`.

    Raises:
        ValueError: If the variable is set but not a number >= 0.
    """
    value = os.environ.get(QUIET_TIMEOUT_ENV)
    if value is None:
        return QUIET_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(
            f"${QUIET_TIMEOUT_ENV} must be a number of seconds >= 0. "
            f"Received: {QUIET_TIMEOUT_ENV}={value!r}"
        )
    return seconds


def wait_for_quiet(limit=QUIET_LOAD, timeout=None, poll=5.0):
    """Sleeps until the 1-minute load average is at most `limit`, or for
    `timeout` seconds (`None`: `quiet_timeout()`); returns the last
    reading (`None` where the load cannot be read, at once).

    Call it after a group's warm-up and before its timings, and record
    what it returns as the load before: a busy machine shows in that
    reading, and the group is flagged (`load_valid`).
    """
    if timeout is None:
        timeout = quiet_timeout()
    deadline = time.monotonic() + timeout
    while True:
        load = load_average()
        if load is None or load <= limit or time.monotonic() >= deadline:
            return load
        time.sleep(poll)


def environment():
    """Metadata for a result file: command, backend, versions, machine, date.

    Returns:
        Dict with `command`, `backend`, `date` (UTC, ISO 8601), `git_commit`,
        `python`, `versions` (installed packages among the ones the project
        uses), `machine` (`platform`, `cpu`, `cpu_count`, `cpu_flags`) and
        `load_average` (1-minute, now; record it again after the run).
    """
    import keras

    versions = {name: _version(name) for name in _PACKAGES}
    return {
        "command": command_line(),
        "backend": keras.backend.backend(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if v is not None},
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            # What decides which matmul layout is fast on a CPU (the
            # training_step ratios moved with it between machines).
            "cpu_flags": _vector_flags(),
            # The CPUs this process may run on, where fewer than all
            # (a timing child pinned by `run_child`).
            "pinned_cpus": _pinned_cpus(),
        },
        "load_average": load_average(),
    }


def _pinned_cpus():
    """The CPUs this process is pinned to, sorted; `None` where it may run
    on all of them or the platform has no CPU affinity."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) < (os.cpu_count() or 0) else None


def _vector_flags():
    """The CPU's vector-extension flags (Linux), sorted; `[]` elsewhere."""
    wanted = ("avx", "fma", "vnni", "amx", "bf16", "sse4")
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(
                        f for f in flags if any(w in f for w in wanted)
                    )
    except OSError:
        pass
    return []


def add_output_argument(parser, default=DEFAULT_OUTPUT):
    """Adds `--output FOLDER`, where a script writes its result files.

    Args:
        parser: An `argparse.ArgumentParser`.
        default: The folder used without `--output`; keep it outside the
            repository.
    """
    parser.add_argument(
        "--output",
        default=default,
        help="Folder for the result files (default: %(default)s). Pass "
        "--output benchmarks/results/<benchmark> to update the committed "
        "results.",
    )


def output_path(folder, name):
    """`<folder>/<name>`, creating the folder if needed."""
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def write_json(path, rows, metadata, **extra):
    """Writes `{"metadata": ..., "rows": [...], **extra}` as indented JSON.

    Args:
        path: Output file path.
        rows: List of dicts (one per result row), JSON-serializable.
        metadata: Usually `environment()`.
        **extra: More top-level keys (settings, notes).
    """
    payload = {"metadata": metadata, **extra, "rows": rows}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as file:
        json.dump(payload, file, indent=2, sort_keys=False, default=_jsonable)
        file.write("\n")


def _jsonable(value):
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"Not JSON serializable: {value!r}")


def format_value(value, spec=None):
    """Formats one table cell: `None` as an em dash, numbers with `spec`."""
    if value is None:
        return "—"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def markdown_table(rows, columns):
    """A GitHub Markdown table.

    Args:
        rows: List of dicts.
        columns: List of `(key, header, format_spec)`; `format_spec` (e.g.
            `".2f"`) or `None`, or a callable `row -> str` instead of a key.

    Returns:
        The table as a string.
    """
    header = "| " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            if callable(key):
                cells.append(key(row))
            else:
                cells.append(format_value(row.get(key), spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metadata_markdown(metadata):
    """A short Markdown paragraph describing how a result was produced.

    Shows `load_average` (taken by `environment()`) and, when the script
    recorded it at the end, `load_average_after`.
    """
    versions = ", ".join(f"{k} {v}" for k, v in metadata["versions"].items())
    machine = metadata["machine"]
    commit = metadata.get("git_commit")
    pinned = ""
    if machine.get("pinned_cpus"):
        cpus = ", ".join(map(str, machine["pinned_cpus"]))
        pinned = f", pinned to CPU {cpus}"
    load = ""
    if metadata.get("load_average") is not None:
        load = f"; load average {metadata['load_average']} before"
        if metadata.get("load_average_after") is not None:
            load += f", {metadata['load_average_after']} after"
    return (
        f"Command: `{metadata['command']}`  \n"
        f"Backend: {metadata['backend']}; {versions}; "
        f"Python {metadata['python']}  \n"
        f"Machine: {machine['platform']}, {machine['cpu']}, "
        f"{machine['cpu_count']} CPUs{pinned}{load}  \n"
        f"Date: {metadata['date']}" + (f", commit {commit}" if commit else "")
    )


def write_markdown(path, rows, metadata, columns, title=None, notes=None):
    """Writes a Markdown file: title, table, notes, then the metadata.

    Args:
        path: Output file path.
        rows: List of dicts.
        metadata: Usually `environment()`.
        columns: See `markdown_table`.
        title: Optional `#`-level heading.
        notes: Optional string or list of strings, printed under the table.
    """
    parts = []
    if title:
        parts.append(f"# {title}\n")
    parts.append(markdown_table(rows, columns) + "\n")
    if notes:
        if isinstance(notes, str):
            notes = [notes]
        parts.append("\n".join(notes) + "\n")
    parts.append(metadata_markdown(metadata) + "\n")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as file:
        file.write("\n".join(parts))


def thread_environment(threads):
    """Environment variables limiting every backend to `threads` threads;
    none for `threads=0` (the backends' defaults).

    On a small machine shared with other work, multi-threaded kernels wait
    on descheduled threads: pass these to a child process that times, and
    pin it (`run_child`).
    """
    if not threads:
        return {}
    threads = str(threads)
    return {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TF_NUM_INTRAOP_THREADS": threads,
        "TF_NUM_INTEROP_THREADS": threads,
        # One thread per matmul; the rest is bounded only by pinning
        # (`child_cpus`).
        "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
    }


def child_cpus(threads):
    """The CPUs a timing child is pinned to: the last `threads` of this
    process's; `None` (not pinned) for `threads=0`, or where the platform
    has no CPU affinity.

    The environment of `thread_environment` does not bound XLA on a CPU:
    JAX runs independent operations of a compiled step at once on a pool
    of one thread per CPU, whatever `XLA_FLAGS` say (the
    `intra_op_parallelism_threads=1` often given there is not an XLA flag,
    and XLA ignores the flags after it). At 784-1024-1024-10,
    batch 256, a JAX training step took 13 ms on two CPUs and 23 ms pinned
    to one, where TensorFlow's took 24 ms either way. Pinning is the way
    JAX's developers give to bound it (jax-ml/jax#1539).
    """
    if not threads or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return set(cpus[-threads:])


def run_child(command, threads, **kwargs):
    """`subprocess.run(command, check=True, **kwargs)` with the child
    pinned to `child_cpus(threads)`."""
    cpus = child_cpus(threads)
    pin = None if cpus is None else lambda: os.sched_setaffinity(0, cpus)
    return subprocess.run(command, check=True, preexec_fn=pin, **kwargs)


def run_backends(module, backends, arguments, threads):
    """Runs `python -m module --child` once per backend; returns their JSON
    outputs.

    Each child is limited to `threads` threads (`thread_environment`) and
    pinned to as many CPUs (`child_cpus`): on a small machine shared with
    other work, multi-threaded kernels wait on descheduled threads and
    their timings become meaningless.
    """
    outputs = {}
    for backend in backends:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "out.json")
            env = dict(os.environ, KERAS_BACKEND=backend)
            env.update(thread_environment(threads))
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
            command = [
                sys.executable,
                "-m",
                module,
                "--child",
                path,
                *arguments,
            ]
            print(f"== {backend}", flush=True)
            run_child(command, threads, env=env, cwd=ROOT)
            with open(path) as file:
                outputs[backend] = json.load(file)
    return outputs


def write_child_output(path, rows, **metadata):
    """A child's output for `run_backends`: its rows and this machine's
    `environment()` with `metadata` added (such as `threads`), as JSON at
    `path`."""
    with open(path, "w") as file:
        json.dump(
            {"metadata": {**environment(), **metadata}, "rows": rows}, file
        )


def combined_outputs(outputs, backend_note=" (one child process each)"):
    """The rows of `run_backends`' outputs, in backend order, and the first
    child's metadata with this run's command and the backends
    (`backend_note` after their names).

    Returns:
        `(rows, metadata)`.
    """
    rows = [row for output in outputs.values() for row in output["rows"]]
    metadata = next(iter(outputs.values()))["metadata"]
    metadata["command"] = command_line()
    metadata["backend"] = ", ".join(outputs) + backend_note
    return rows, metadata


# The last columns of a timing table whose rows hold `load_before`,
# `load_after` and `valid` (`load_valid`).
LOAD_COLUMNS = [
    (lambda r: f"{r['load_before']:.2f} / {r['load_after']:.2f}",
     "Load before / after", None),
    (lambda r: "yes" if r["valid"] else "no (machine busy)", "Valid", None),
]


def block(value):
    """Waits for an asynchronous result (JAX, TensorFlow) and returns it."""
    if isinstance(value, (list, tuple)):
        for item in value:
            block(item)
    elif hasattr(value, "block_until_ready"):
        value.block_until_ready()
    elif hasattr(value, "numpy") and not hasattr(value, "detach"):
        value.numpy()
    return value


def page_faults(call, repeats=5):
    """The minor page faults this process takes per `call()`: the median
    over `repeats` calls, after one call not counted.

    A fault is the kernel mapping a fresh page (zeroing it) on first
    touch; an allocator that returns freed memory to the system pays one
    per 4 KiB page of every large temporary again on each call, a cost
    the timing includes and that varies with the allocator's state.

    Returns:
        The median count, or `None` where the platform does not count
        them (no `resource` module).
    """
    try:
        import resource
    except ImportError:
        return None

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    block(call())
    counts = []
    for _ in range(repeats):
        before = faults()
        block(call())
        counts.append(faults() - before)
    return statistics.median(counts)


def interleaved_medians(
    candidates, warmup=0, repeats=10, rest=1.0, settle=0
):
    """Median seconds of each callable, run in turn after a warm-up.

    After each timed round the process sleeps `rest` times the round's
    duration. A benchmark that never sleeps keeps one core busy, and on a
    2-core machine its own thread alone lifts the 1-minute load average
    to about 1, the level above which a timing is not evidence; resting
    as long as it works holds that reading near 0.5, so what the load
    records is the machine's other work.

    Args:
        candidates: Dict `name -> zero-argument callable`.
        warmup: Rounds run first and discarded (compilation, caches).
        repeats: Timed rounds; each round runs every candidate once, in
            a rotating order, so slow phases of a shared machine hit all.
        rest: Sleep after each timed round, as a multiple of its
            duration; 0 never sleeps.
        settle: Untimed calls of each candidate right before its timed
            one, in each round: the timed call then follows a call of
            the same work, as a step follows a step in a training loop,
            not another candidate's call (whose freed buffers, of other
            sizes, it would otherwise page in afresh; every candidate
            does not follow the same kind of neighbour).

    Returns:
        Dict `name -> median seconds`.
    """
    if rest < 0:
        raise ValueError(f"`rest` must be >= 0. Received: rest={rest!r}")
    if settle < 0:
        raise ValueError(
            f"`settle` must be >= 0. Received: settle={settle!r}"
        )
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            block(candidates[name]())
    times = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        round_start = time.perf_counter()
        for name in names[shift:] + names[:shift]:
            for _ in range(settle):
                block(candidates[name]())
            start = time.perf_counter()
            block(candidates[name]())
            times[name].append(time.perf_counter() - start)
        if rest:
            time.sleep(rest * (time.perf_counter() - round_start))
    return {name: statistics.median(values) for name, values in times.items()}


def mean_std(values):
    """`(mean, sample std)` of a list of numbers; std 0.0 for one value."""
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def median_ratio(numerators, denominators):
    """`median(numerators) / median(denominators)`, e.g. two timings."""
    return statistics.median(numerators) / statistics.median(denominators)


class Progress:
    """A one-line-per-step progress display with elapsed time and ETA.

    Example:

    >>> progress = Progress(total=12, label="paper_table")
    >>> progress.step("mnist seed 0 baseline", "acc 0.981")

    Args:
        total: Number of steps expected.
        label: Prefix of every line.
        stream: Where to write (default `sys.stdout`, flushed each line).
    """

    def __init__(self, total, label="", stream=None):
        self.total = total
        self.label = label
        self.stream = stream or sys.stdout
        self.done = 0
        self.start = time.perf_counter()

    def step(self, what, detail=""):
        """Reports one finished step and the estimated time left."""
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        prefix = f"[{self.label}] " if self.label else ""
        self.stream.write(
            f"{prefix}{self.done}/{self.total} {what} {detail} "
            f"(elapsed {elapsed / 60:.1f} min, ~{left / 60:.1f} min left)\n"
        )
        self.stream.flush()

    def note(self, message):
        """Writes a free-form line."""
        prefix = f"[{self.label}] " if self.label else ""
        self.stream.write(f"{prefix}{message}\n")
        self.stream.flush()
