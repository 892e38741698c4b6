"""Native kernels of keras_midl, built on first use with the C compiler.

One C file, `select_gather.c`: `midl_select_gather` takes the gate
logits, selects the `k` neurons `keras_midl.selection.topk_mask` selects,
and writes their full-path dot products, read from the selected rows of
the kernel in place, over the light path; `midl_sparse_forward` computes
the gate and the light path too (`select_gather` and `sparse_forward`
here are their NumPy entry points); `jax_ffi.cc` wraps
`midl_sparse_forward` as an XLA FFI custom call for JAX
(`jax_ffi_available`, built with a C++ compiler against jaxlib's
headers). It is compiled once
per machine by the system C compiler (`$CC`, else `cc`, `gcc` or
`clang`), with AVX2 and FMA where the CPU reports them, into a cache
folder (`$KERAS_MIDL_CACHE`, else `$XDG_CACHE_HOME/keras_midl` or
`~/.cache/keras_midl`), and loaded with `ctypes`. Where no compiler is
found or the build fails, `library()` returns `None` after one warning and
callers use their `keras.ops` path. `KERAS_MIDL_COMPILE=0` turns native
kernels off.

Example:

>>> logits = np.array([[0.5, 2.0, -1.0, 2.0]], "float32")
>>> kernel = np.arange(12, dtype="float32").reshape(4, 3)
>>> rows = np.ones((1, 3), "float32")
>>> light = np.zeros((1, 4), "float32")
>>> outputs, selected = keras_midl.native.select_gather(
...     logits, kernel, rows, 2, light)
>>> outputs.tolist(), selected.tolist()
([[0.0, 12.0, 0.0, 30.0]], [[1, 3]])
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np

SOURCE = os.path.join(os.path.dirname(__file__), "select_gather.c")
FFI_SOURCE = os.path.join(os.path.dirname(__file__), "jax_ffi.cc")
JAX_TARGET = "keras_midl_sparse_forward"
CACHE_ENV = "KERAS_MIDL_CACHE"
COMPILE_ENV = "KERAS_MIDL_COMPILE"

_state = {}


def enabled():
    """Whether keras_midl may compile its own kernels (`KERAS_MIDL_COMPILE`,
    default on)."""
    value = os.environ.get(COMPILE_ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def _first_program(variable, *names):
    """The path of `$variable`, else of the first of `names` on PATH."""
    for name in (os.environ.get(variable), *names):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _compiler():
    return _first_program("CC", "cc", "gcc", "clang")


def _cxx_compiler():
    return _first_program("CXX", "c++", "g++", "clang++")


def _cpu_flags():
    """The CPU's feature flags (Linux); empty where not readable."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags():
    """The compiler flags for this machine."""
    flags = ["-O3", "-std=c99", "-shared", "-fPIC"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        if {"avx2", "fma"} <= _cpu_flags():
            flags += ["-mavx2", "-mfma"]
    return flags


def _cache_folder():
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        folder = os.path.join(base, "keras_midl")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        folder = os.path.join(tempfile.gettempdir(), "keras_midl")
        os.makedirs(folder, exist_ok=True)
    return folder


def _run(command):
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        raise RuntimeError(
            f"{command[0]} failed: {error.stderr.strip()[-2000:]}"
        ) from error


def _cached_library(stem, key_parts, build):
    """The library `build(work, output)` writes, compiled once per
    `key_parts` (sources, compilers, flags) and machine into the cache
    folder, then loaded. It is built in a temporary folder and renamed:
    concurrent processes (test workers) never load a half-written file."""
    key_parts = [*key_parts, platform.machine(), sys.platform]
    key = hashlib.sha256(
        b"\0".join(
            part if isinstance(part, bytes) else part.encode()
            for part in key_parts
        )
    ).hexdigest()[:16]
    folder = _cache_folder()
    path = os.path.join(folder, f"{stem}-{key}.so")
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=folder) as work:
            partial = os.path.join(work, f"{stem}.so")
            build(work, partial)
            os.replace(partial, path)
    return ctypes.CDLL(path)


def _sources(*paths):
    contents = []
    for path in paths:
        with open(path, "rb") as source:
            contents.append(source.read())
    return contents


def _build():
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
    flags = compile_flags()
    lib = _cached_library(
        "select_gather",
        [*_sources(SOURCE), compiler, " ".join(flags)],
        lambda work, output: _run([compiler, *flags, SOURCE, "-o", output]),
    )
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.midl_select_gather.argtypes = [pointer, size, pointer, size]
    lib.midl_select_gather.argtypes += [pointer, size, size, pointer]
    lib.midl_select_gather.argtypes += [pointer, pointer, pointer]
    lib.midl_select_gather.restype = None
    lib.midl_sparse_forward.argtypes = [pointer, size, size, pointer, size]
    lib.midl_sparse_forward.argtypes += [pointer] * 6 + [size, size]
    lib.midl_sparse_forward.argtypes += [pointer] * 3
    lib.midl_sparse_forward.restype = None
    return lib


def _build_jax_ffi():
    """Builds `select_gather.c` and `jax_ffi.cc` against jaxlib's FFI
    headers into one library and registers its handler with XLA."""
    import jax
    import jaxlib

    compiler, cxx = _compiler(), _cxx_compiler()
    if compiler is None or cxx is None:
        raise RuntimeError("no C and C++ compilers found ($CC, $CXX, ...)")
    object_flags = [f for f in compile_flags() if f != "-shared"]
    cxx_flags = [f for f in object_flags if f != "-std=c99"]
    cxx_flags += ["-std=c++17", "-w", "-I", jax.ffi.include_dir()]

    def build(work, output):
        c_object = os.path.join(work, "select_gather.o")
        cxx_object = os.path.join(work, "jax_ffi.o")
        _run([compiler, *object_flags, "-c", SOURCE, "-o", c_object])
        _run([cxx, *cxx_flags, "-c", FFI_SOURCE, "-o", cxx_object])
        _run([cxx, "-shared", c_object, cxx_object, "-o", output])

    key_parts = [*_sources(SOURCE, FFI_SOURCE), compiler, cxx]
    key_parts += [" ".join(cxx_flags), jaxlib.__version__]
    lib = _cached_library("jax_ffi", key_parts, build)
    jax.ffi.register_ffi_target(
        JAX_TARGET, jax.ffi.pycapsule(lib.MidlSparseForward), platform="cpu"
    )
    return lib


def _built_once(name, build, what):
    """`build()`'s result, cached in `_state[name]`; `None` after one
    warning where it fails, or where native kernels are off."""
    if not enabled():
        return None
    if name not in _state:
        try:
            _state[name] = build()
        except Exception as error:  # no compiler, build or load failure
            _state[name] = None
            warnings.warn(
                f"keras_midl: could not build the native sparse inference "
                f"kernel{what} ({type(error).__name__}: {error}); using "
                f"the slower fallback. Set {COMPILE_ENV}=0 to skip building.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state[name]


def jax_ffi_available():
    """Whether the XLA FFI custom call `JAX_TARGET` is registered (built
    and registered on the first call; `False` after one warning where it
    cannot be built, or where native kernels are off)."""
    return _built_once("jax_ffi", _build_jax_ffi, " for JAX") is not None


def library():
    """The loaded native library (`ctypes.CDLL`), built on first call;
    `None` where native kernels are off or could not be built (one
    warning)."""
    return _built_once("library", _build, "")


def select_gather_pointers(
    logits, units, kernel, dim, rows, count, k, bias, outputs, selected
):
    """`midl_select_gather` on raw addresses (ints; `bias` may be 0).

    The caller guarantees C-contiguous float32 `logits (count, units)`,
    `kernel (units, dim)`, `rows (count, dim)`, `bias (units,)`,
    `outputs (count, units)` (the light path, overwritten at the selected
    neurons) and int64 `selected (count, k)`, `1 <= k <= units`.
    """
    scratch = np.empty(2 * units, np.float32)
    library().midl_select_gather(
        logits,
        units,
        kernel,
        dim,
        rows,
        count,
        k,
        bias or None,
        outputs,
        selected,
        scratch.ctypes.data,
    )


def select_gather(logits, kernel, rows, k, light, bias=None):
    """The NumPy entry point of `midl_select_gather`.

    Args:
        logits: Array `(count, units)`, the gate logits.
        kernel: Array `(units, dim)`.
        rows: Array `(count, dim)`.
        k: Int in `[1, units]`, neurons selected per row.
        light: Array `(count, units)`, the light path.
        bias: Optional array `(units,)`.

    Returns:
        `(outputs, selected)`: float32 `(count, units)`, the light path
        with the selected neurons' full path, and int64 `(count, k)`,
        their indices, increasing.
    """
    logits = np.ascontiguousarray(logits, np.float32)
    kernel = np.ascontiguousarray(kernel, np.float32)
    rows = np.ascontiguousarray(rows, np.float32)
    count, units = logits.shape
    dim = kernel.shape[1]
    if kernel.shape[0] != units or rows.shape != (count, dim):
        raise ValueError(
            f"Expected `kernel` of shape ({units}, d) and `rows` of shape "
            f"({count}, d); received {kernel.shape} and {rows.shape}"
        )
    if not 1 <= k <= units:
        raise ValueError(f"`k` must be in [1, {units}]; received k={k}")
    outputs = np.array(light, np.float32, order="C", copy=True)
    if outputs.shape != (count, units):
        raise ValueError(
            f"`light` must have shape {(count, units)}; received "
            f"{outputs.shape}"
        )
    if bias is not None:
        bias = np.ascontiguousarray(bias, np.float32)
        _check_shape("bias", bias, (units,))
    if library() is None:
        return _select_gather_numpy(logits, kernel, rows, k, outputs, bias)
    selected = np.empty((count, k), np.int64)
    select_gather_pointers(
        logits.ctypes.data,
        units,
        kernel.ctypes.data,
        dim,
        rows.ctypes.data,
        count,
        k,
        0 if bias is None else bias.ctypes.data,
        outputs.ctypes.data,
        selected.ctypes.data,
    )
    return outputs, selected


def _check_shape(name, array, shape):
    if array.shape != shape:
        raise ValueError(
            f"`{name}` must have shape {shape}; received {array.shape}"
        )


def _select_gather_numpy(logits, kernel, rows, k, outputs, bias):
    """`select_gather` in NumPy, where the library is not available."""
    clean = np.where(np.isnan(logits), -np.inf, logits)
    clean = np.where(np.abs(clean) < np.finfo(np.float32).tiny, 0, clean)
    positions = np.arange(clean.shape[1])
    selected = np.stack(
        [np.sort(np.lexsort((positions, -row))[:k]) for row in clean]
    ).astype(np.int64)
    values = np.einsum("bd,bkd->bk", rows, kernel[selected])
    if bias is not None:
        values = values + bias[selected]
    np.put_along_axis(outputs, selected, values, axis=1)
    return outputs, selected


def sparse_forward_pointers(
    rows, count, dim, weights, rank, units, k, outputs, selected
):
    """`midl_sparse_forward` on raw addresses.

    `weights` maps the names of `midl_sparse_forward`'s weight arguments
    (`projection`, `gate_kernel`, `gate_bias`, `light_kernel`,
    `light_bias`, `kernel`, `bias`) to addresses (0 or missing: none).
    The caller guarantees C-contiguous float32 arrays of the documented
    shapes, int64 `selected (count, k)`, `1 <= k <= units`.
    """
    scratch = np.empty(rank + 3 * units, np.float32)
    (_state.get("library") or library()).midl_sparse_forward(
        rows,
        count,
        dim,
        weights["projection"],
        rank,
        weights["gate_kernel"],
        weights.get("gate_bias") or None,
        weights.get("light_kernel") or None,
        weights.get("light_bias") or None,
        weights["kernel"],
        weights.get("bias") or None,
        units,
        k,
        outputs,
        selected,
        scratch.ctypes.data,
    )


FORWARD_WEIGHTS = (
    "projection",
    "gate_kernel",
    "gate_bias",
    "light_kernel",
    "light_bias",
    "kernel",
    "bias",
)


def sparse_forward(rows, weights, k):
    """A MIDL layer's inference forward (before the activation), in C.

    `z = x V`, logits `z G + c`, light path `z U + b_lite`; the `k`
    neurons `topk_mask` selects from the logits get `x . W^T[j] + b[j]`
    (see `midl_sparse_forward`). The gate's sums run in C's order: where
    two logits are within float rounding of each other at the threshold,
    the selection can differ from that of a gate computed by BLAS.

    Args:
        rows: Array `(count, dim)`.
        weights: Dict of arrays over `FORWARD_WEIGHTS` (MIDL's names:
            `kernel` is `(units, dim)`); the biases and `light_kernel` may
            be `None`.
        k: Int in `[1, units]`.

    Returns:
        `(outputs, selected)`: float32 `(count, units)` and int64
        `(count, k)` (increasing).
    """
    rows = np.ascontiguousarray(rows, np.float32)
    arrays = {
        name: None
        if weights.get(name) is None
        else np.ascontiguousarray(weights[name], np.float32)
        for name in FORWARD_WEIGHTS
    }
    units, dim = arrays["kernel"].shape
    rank = arrays["projection"].shape[1]
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(
            f"`rows` must have shape (count, {dim}); received {rows.shape}"
        )
    shapes = {
        "projection": (dim, rank),
        "gate_kernel": (rank, units),
        "gate_bias": (units,),
        "light_kernel": (rank, units),
        "light_bias": (units,),
        "bias": (units,),
    }
    for name, shape in shapes.items():
        if arrays[name] is not None:
            _check_shape(name, arrays[name], shape)
    if not 1 <= k <= units:
        raise ValueError(f"`k` must be in [1, {units}]; received k={k}")
    count = rows.shape[0]
    outputs = np.empty((count, units), np.float32)
    selected = np.empty((count, k), np.int64)
    if library() is None:
        code = rows @ arrays["projection"]
        logits = code @ arrays["gate_kernel"]
        if arrays["gate_bias"] is not None:
            logits = logits + arrays["gate_bias"]
        light = np.zeros((count, units), np.float32)
        if arrays["light_kernel"] is not None:
            light = code @ arrays["light_kernel"]
            if arrays["light_bias"] is not None:
                light = light + arrays["light_bias"]
        return _select_gather_numpy(
            logits, arrays["kernel"], rows, k, light, arrays["bias"]
        )
    addresses = {
        name: 0 if array is None else array.ctypes.data
        for name, array in arrays.items()
    }
    sparse_forward_pointers(
        rows.ctypes.data,
        count,
        dim,
        addresses,
        rank,
        units,
        k,
        outputs.ctypes.data,
        selected.ctypes.data,
    )
    return outputs, selected
