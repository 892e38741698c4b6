"""Which inference path a MIDL layer takes, and the one call that runs it.

`MIDL.call` outside training asks `inference(layer, inputs)`; it returns
the layer's output, or `None` where the layer runs its masked path inline.
The rule, explicit and the same for every model:

* **Where the native C kernel runs** (`keras_midl.native`): in calls that
  run eagerly, on a CPU, for a float32 layer (float or int8 kernel, no
  LoRA), with native kernels enabled (`keras_midl.config`) and built. An
  int8 layer (`model.quantize("int8")`) needs Keras's default input
  quantizer, whose arithmetic the kernel reproduces, or none
  (`native_quantizes_inputs`). On PyTorch that is every call except
  under `torch.compile` or `torch.jit.trace` (for an int8 layer, calls
  that record no gradient: `torch.no_grad()`, `predict`); on
  TensorFlow and JAX it is `layer(x)`, `model(x)` and a model compiled
  with `run_eagerly=True` (its `predict` too). The kernel is opaque to
  tracing, so it never runs inside a trace: Keras's `predict`,
  `predict_on_batch` and `fit` (traced by default), a user's
  `tf.function` or `jax.jit`, and every export.
* **The masked path where the native kernel runs** (`"masked"`, and
  `"auto"` where it does not gather), on PyTorch where no gradient is
  recorded (`torch.no_grad()`, `predict`): torch's matmuls compute the
  gate logits and both paths without their biases, then one C pass
  (`native_select_mix`) selects, adds the biases and mixes, writing no
  mask; the masked path's values bit for bit. Where a gradient may be
  recorded the masked path runs as in training (the gate gets its
  gradient). On TensorFlow and JAX the compiled eager call below runs.
* **Inside a trace** the layer runs `keras.ops` only, which exports:
  `inference_path="gathered"` the chunked gathered path
  (`keras_midl.ops.gathered`), `"auto"` that path where
  `TRACED_AUTO_RULES` (int8 layers: `TRACED_INT8_AUTO_RULES`) says it
  is faster than the masked one (for a batch
  size unknown while tracing, TensorFlow chooses per call with `ops.cond`),
  else the masked path. On PyTorch under `torch.compile` the gathered path
  is written in torch ops and compiled with the caller's graph.
* **Eager calls where the native kernel cannot run**: on TensorFlow and
  JAX the layer's whole inference call runs as one compiled function (a
  `tf.function`, `jax.jit`), cached on the layer and keyed on everything
  the trace depends on (`k`, the activation, the paths, the dtype policy,
  the quantization mode, LoRA's rank and scale); on PyTorch the gathered
  path runs through `torch.compile`, else `keras.ops`.
* **With LoRA** (`MIDL.enable_lora`) the native kernel never runs: it
  reads the frozen kernel's buffer, without the update `W + s A B`. Such
  a layer takes the same paths as where native kernels are off: its
  compiled eager call on TensorFlow and JAX, `keras.ops` on PyTorch (the
  `torch.compile`d gathered path takes no LoRA either); the `keras.ops`
  gathered path adds the update of the selected neurons. Saving merges
  the update into the kernel, so those weights loaded into a layer built
  without LoRA compute the same and run natively again.

`"auto"` in eager calls follows `NATIVE_AUTO_RULES`, measured with the
native kernel (`benchmarks/latency.py`); for an int8 layer, the native
kernel up to `NATIVE_INT8_MAX_ROWS` rows (`benchmarks/latency_int8.py`).
"""

import types
import typing
import weakref

import keras
from keras import ops
from keras import quantizers

from keras_midl import backend as backends
from keras_midl import config
from keras_midl import native
from keras_midl.ops import gathered
from keras_midl.ops import selection
from keras_midl.ops.selection import topk_mask

WEIGHT_NAMES = backends.WEIGHT_NAMES


class AutoRule(typing.NamedTuple):
    """Where `inference_path="auto"` gathers, for one backend: inputs of
    `1 <= rows <= max_rows` rows, layers of at least `min_weights` weights
    (`d * n`) and `k_ratio <= max_k_ratio`; masked otherwise."""

    max_rows: int
    min_weights: int
    max_k_ratio: float


# Where benchmarks/latency.py (the grid in benchmarks/results/latency/
# latency.md: one thread, d = n in {1024, ..., 8192}, batch 1-256,
# k_ratio 0.25-0.75) measured the eager native call faster than the
# masked path in a compiled forward (an eager masked call also pays
# Keras's eager layer call, so these rules lean towards masked). First
# measured on an AMD EPYC; the reruns on a Xeon (commits 56bf3a9,
# 1d02728 and 14f8f40, the latter two with torch's faster masked path)
# hold them but for the cells named:
# * torch: 1-8 rows at every measured size (at 1d02728 two cells at
#   0.93-0.94x, 4096 and 8192, k_ratio 0.75, batch 2; at 14f8f40 one of
#   them, 0.94x; at 56bf3a9 one at 0.99x);
# * tensorflow: 1-8 rows from d = n = 4096 (cells at 0.86-0.98x at
#   batch 8, k_ratio 0.45-0.75); at 1024 and 2048 the eager call's
#   overhead costs about what the kernel saves;
# * jax: 1-2 rows from d = n = 4096 with k_ratio <= 0.45 (at 4096,
#   k_ratio 0.45, one row, 0.86x, 0.89x and 0.96x of the compiled masked
#   path in the grid's three reruns; in latency_target.md 1.48x at commit
#   022269b, 0.81x at 218bffd, 1.11x at 97eafee, 0.85x at 39bb24a, 1.17x
#   at 39a31ad: JAX's timings move most between runs; at 8192,
#   0.99-2.53x).
NATIVE_AUTO_RULES = {
    "torch": AutoRule(max_rows=8, min_weights=1024 * 1024, max_k_ratio=0.75),
    "tensorflow": AutoRule(
        max_rows=8, min_weights=4096 * 4096, max_k_ratio=0.75
    ),
    "jax": AutoRule(max_rows=2, min_weights=4096 * 4096, max_k_ratio=0.45),
}
# An int8 layer's masked path quantizes its inputs and runs an integer
# matmul, as Keras's int8 Dense does, 2-10x slower than float Dense at
# small batch (benchmarks/results/latency/latency_int8.md; before this
# rule, JAX's auto path at d = n = 4096, batch 8 ran it in 35.6 ms against
# float Dense's 10.1 ms), while the native int8 kernel reads a
# quarter of the float bytes: in eager calls it runs for every int8 layer
# it applies to, up to the 64 rows of one batch block (measured at 1-8
# rows, d = n in {1024, 4096, 8192}; 9-64 rows were not measured).
NATIVE_INT8_MAX_ROWS = 64
# Except on JAX, whose compiled masked int8 call (XLA's int8 dot,
# `midl._int8_dot_jax`) took 2.0-2.9 ms at 2-8 rows of a 4096 x 4096
# layer against the native kernel's 2.7-4.7 ms in eager calls, and
# 4.9-8.9 against 6.1-12.5 ms at 8192 (latency_int8_jax.md): the native
# kernel there for one row only.
NATIVE_INT8_MAX_ROWS_BY_BACKEND = {"jax": 1}
# Where the chunked `keras.ops` gathered path beat the masked one inside a
# trace (the same grid, traced rows): on TensorFlow one row from d = n =
# 4096 at k_ratio 0.25 (1.27-1.46x; at 0.45, 0.90-0.98x); on JAX 1-2 rows
# from d = n = 2048 at k_ratio 0.25 (1.35-3.2x; at 0.45 batch 1 lost up to
# d = 4096; in 14f8f40's grid the cells at 4096 and two rows at 2048 lost,
# 0.72-0.92x, JAX's noisiest timings; kept). torch has no rule: under
# `torch.compile` the torch-ops path runs.
TRACED_AUTO_RULES = {
    "tensorflow": AutoRule(
        max_rows=1, min_weights=4096 * 4096, max_k_ratio=0.25
    ),
    "jax": AutoRule(max_rows=2, min_weights=2048 * 2048, max_k_ratio=0.25),
}
# The same for int8 layers, whose masked path inside a trace runs a matmul
# of the whole dequantized kernel. Measured with traced `predict_on_batch`
# of one-layer models, k_ratio 0.45, in a side-by-side comparison at a
# load average near 2 (ratios of 2-5x, not small differences): at 4096 x
# 4096, JAX gathered 4.4-10 ms against masked 19-23 ms at 1-4 rows,
# TensorFlow 5.0 against 8.2 ms at one row and 15 against 9 ms at four;
# at 1024 x 1024 within noise. Since JAX's masked int8 path is XLA's int8
# dot (`midl._int8_dot_jax`) it is faster than gathering at every batch
# size there (1.5-2.2 ms at 2-4 rows against 5-11 ms gathered): JAX has
# no rule. Current timings, every backend:
# benchmarks/results/latency/latency_int8.md.
TRACED_INT8_AUTO_RULES = {
    "tensorflow": AutoRule(
        max_rows=1, min_weights=4096 * 4096, max_k_ratio=0.45
    ),
}
# Rows of `W^T` gathered per step inside a trace (`gathered_full_path`).
TRACED_CHUNKS = {"tensorflow": gathered.CHUNK_ROWS, "jax": gathered.CHUNK_ROWS}


def layer_weights(layer):
    """The tensors of a built MIDL layer that the gathered path reads.

    Returns:
        Dict `name -> tensor or None` over `WEIGHT_NAMES`; `kernel_scale`
        is set for an int8-quantized layer only.
    """
    weights = {}
    for name in WEIGHT_NAMES:
        variable = getattr(layer, name, None)
        weights[name] = None if variable is None else variable.value
    if layer.quantization_mode != "int8":
        weights["kernel_scale"] = None
    return weights


def lora_enabled(layer):
    """Whether LoRA is enabled on the layer (`MIDL.enable_lora`)."""
    return bool(getattr(layer, "lora_enabled", False))


def lora_factors(layer):
    """`(lora_kernel_a, lora_kernel_b, scale)` of a layer with LoRA, as
    `keras_midl.ops.gathered.gathered_outputs` takes them; `None` without.
    """
    if not lora_enabled(layer):
        return None
    return (
        layer.lora_kernel_a.value,
        layer.lora_kernel_b.value,
        layer.lora_scale,
    )


def static_rows(inputs):
    """Number of rows (product of the leading axes), `None` if not static."""
    rows = 1
    for size in inputs.shape[:-1]:
        if size is None:
            return None
        rows *= size
    return rows


def native_quantizes_inputs(layer):
    """For an int8 layer, how the native kernel matches its full path:
    `True` where the layer quantizes its inputs with Keras's default
    `AbsMaxQuantizer` (the kernel quantizes each row the same way and sums
    in int32), `False` where it has no input quantizer (float inputs),
    `None` for any other input quantizer (no native kernel)."""
    quantizer = getattr(layer, "inputs_quantizer", None)
    if not quantizer:
        return False
    if (
        isinstance(quantizer, quantizers.AbsMaxQuantizer)
        and tuple(quantizer.value_range) == (-127, 127)
        and quantizer.epsilon == 1e-7
        and keras.backend.standardize_dtype(quantizer.output_dtype) == "int8"
    ):
        return True
    return None


def native_applies(layer):
    """Whether the native kernel can compute this layer: float32 compute
    and gate dtypes, float or int8 (with an input quantizer the kernel
    reproduces, see `native_quantizes_inputs`), no LoRA (the kernel reads
    `W`, not `W + s A B`), native kernels enabled and built (the device
    and the tensors are checked by the backend at the call)."""
    return (
        (
            layer.quantization_mode is None
            or (
                layer.quantization_mode == "int8"
                and native_quantizes_inputs(layer) is not None
            )
        )
        and not lora_enabled(layer)
        and layer.compute_dtype == "float32"
        and layer.gate_dtype == "float32"
        and config.native_kernels_enabled()
        and native.available()
    )


def use_gathered_path(
    rows, input_dim, units, k_ratio, backend=None, traced=False
):
    """The `inference_path="auto"` rule: whether to gather.

    Example:

    >>> keras_midl.ops.dispatch.use_gathered_path(
    ...     256, 4096, 4096, 0.45)    # a large batch: always masked
    False

    Args:
        rows: Number of input rows (product of the leading axes).
        input_dim: `d`.
        units: `n`.
        k_ratio: The layer's `k_ratio`.
        backend: Backend name; default the current one.
        traced: `False` for an eager call with the native kernel
            (`NATIVE_AUTO_RULES`), `True` for the `keras.ops` path inside
            a trace (`TRACED_AUTO_RULES`).

    Returns:
        Python bool.
    """
    backend = backend or keras.backend.backend()
    rules = TRACED_AUTO_RULES if traced else NATIVE_AUTO_RULES
    rule = rules.get(backend)
    if rule is None or rows is None:
        return False
    return (
        1 <= rows <= rule.max_rows
        and input_dim * units >= rule.min_weights
        and k_ratio <= rule.max_k_ratio
    )


def native_auto_gathers(layer, rows):
    """Whether an eager `inference_path="auto"` call on `rows` rows (`None`:
    unknown) runs the native kernel, where it applies: by
    `NATIVE_AUTO_RULES`, or for an int8 layer up to `NATIVE_INT8_MAX_ROWS`
    rows (`NATIVE_INT8_MAX_ROWS_BY_BACKEND` where it differs)."""
    if layer.quantization_mode == "int8":
        max_rows = NATIVE_INT8_MAX_ROWS_BY_BACKEND.get(
            keras.backend.backend(), NATIVE_INT8_MAX_ROWS
        )
        return rows is not None and 1 <= rows <= max_rows
    return use_gathered_path(
        rows, layer.input_dim, layer.units, layer.k_ratio
    )


def traced_auto_rule(layer, backend=None):
    """The `AutoRule` of `inference_path="auto"` inside a trace for this
    layer (`TRACED_INT8_AUTO_RULES` for an int8 layer, else
    `TRACED_AUTO_RULES`), `None` where the backend has none."""
    backend = backend or keras.backend.backend()
    if layer.quantization_mode == "int8":
        return TRACED_INT8_AUTO_RULES.get(backend)
    return TRACED_AUTO_RULES.get(backend)


def traced_auto_gathers(layer, rows):
    """Whether `inference_path="auto"` inside a trace gathers for `rows`
    static rows (`None`: unknown while tracing, decided per call), by
    `traced_auto_rule`."""
    rule = traced_auto_rule(layer)
    return (
        rule is not None
        and rows is not None
        and _large_enough(layer, rule)
        and 1 <= rows <= rule.max_rows
    )


def _large_enough(layer, rule):
    return (
        layer.input_dim * layer.units >= rule.min_weights
        and layer.k_ratio <= rule.max_k_ratio
    )


def inference(layer, inputs):
    """A MIDL layer's inference output (activation included) by the rule in
    the module docstring, or `None` where the caller runs the masked path
    inline."""
    module = backends.current()
    inputs = ops.convert_to_tensor(inputs)
    if module.exporting():
        # A tracing exporter records the masked path: the gathered one's
        # scatter becomes `aten::ravel`, which ONNX opset 20 lacks.
        return None
    path = layer.inference_path
    if not module.in_trace(inputs):
        if native_applies(layer):
            gather = path == "gathered" or (
                path == "auto"
                and native_auto_gathers(layer, static_rows(inputs))
            )
            if gather:
                outputs = module.native_forward(
                    inputs,
                    layer_weights(layer),
                    layer.k,
                    quantize_inputs=native_quantizes_inputs(layer),
                )
            else:
                outputs = _natively_mixed(layer, inputs, module)
            if outputs is not None:
                return _activate(layer, outputs)
        compiled = compiled_layer_call(layer, module)
        if compiled is not None:
            return compiled(inputs)
    if path == "masked":
        return None
    if path == "gathered":
        return _activate(layer, _gathered(layer, inputs, module))
    rule = traced_auto_rule(layer)
    if rule is None or not _large_enough(layer, rule):
        return None
    rows = static_rows(inputs)
    if rows is not None:
        if 1 <= rows <= rule.max_rows:
            return _activate(layer, _gathered(layer, inputs, module))
        return None
    # A batch size unknown while tracing (Keras relaxes `predict`'s shape
    # after a second one): the rule is applied at every call.
    count = ops.shape(ops.reshape(inputs, (-1, layer.input_dim)))[0]
    return ops.cond(
        ops.logical_and(count >= 1, count <= rule.max_rows),
        lambda: _activate(layer, _gathered(layer, inputs, module)),
        lambda: layer.masked_outputs(inputs, training=False),
    )


def _natively_mixed(layer, inputs, module):
    """The masked path's output before the activation, its selection and
    mix in one native pass (`native_select_mix`: no mask, the biases
    added in the same pass; the same values), where the backend runs it
    for this call (torch, no gradient recorded) and the layer is a float
    one; else `None`."""
    if layer.quantization_mode is not None or not (
        module.native_select_mix_runs(inputs)
    ):
        return None
    logits, full, light = layer.unbiased_paths(inputs)
    weights = layer_weights(layer)
    return module.native_select_mix(
        logits, layer.k, full, weights["bias"], light, weights["light_bias"]
    )


def _activate(layer, outputs):
    return outputs if layer.activation is None else layer.activation(outputs)


def _gathered(layer, inputs, module):
    """The gathered forward before the activation, `keras.ops` unless the
    backend compiles it."""
    weights = layer_weights(layer)
    lora = lora_factors(layer)
    if (
        layer.quantization_mode is None
        and layer.compute_dtype == "float32"
        and lora is None
    ):
        outputs = module.compiled_gathered(inputs, weights, layer.k)
        if outputs is not None:
            return outputs
    quantizer = None
    if layer.quantization_mode == "int8":
        quantizer = layer.inputs_quantizer or None
    return gathered.gathered_outputs(
        inputs,
        weights,
        layer.k,
        selection=layer.inference_selection_method(static_rows(inputs)),
        compute_dtype=layer.compute_dtype,
        gate_dtype=layer.gate_dtype,
        inputs_quantizer=quantizer,
        chunk=TRACED_CHUNKS.get(keras.backend.backend()),
        lora=lora,
    )


class CompiledCalls:
    """A layer's compiled eager calls, keyed on what their traces depend
    on. A plain object, not a dict: Keras and TensorFlow track the dicts a
    layer holds (and an export then refuses their tuple keys)."""

    def __init__(self):
        self._functions = {}

    def __contains__(self, key):
        return key in self._functions

    def __getitem__(self, key):
        return self._functions[key]

    def __setitem__(self, key, function):
        self._functions[key] = function

    def __len__(self):
        return len(self._functions)

    def values(self):
        return self._functions.values()

    def clear(self):
        self._functions.clear()


def _call_key(layer):
    """Everything a compiled inference call depends on, besides the
    weights (passed as arguments) and the input shape."""
    return (
        layer.k,
        layer.inference_path,
        layer.selection,
        layer.activation,
        layer.quantization_mode,
        layer.dtype_policy.name,
        # The scale is a constant of the trace.
        (layer.lora_rank, layer.lora_alpha) if lora_enabled(layer) else None,
    )


def compiled_layer_call(layer, module=None, static_shapes=False):
    """The layer's inference call as one compiled function, for an eager
    call on TensorFlow or JAX; `None` elsewhere. `layer` is a MIDL or
    MIDLConv2D layer (it has `compiled_calls`); `module`: the backend
    module, default the current one; `static_shapes`: trace once per
    input shape, never for an unknown batch size (see the backends'
    `compile_layer_call`)."""
    module = module or backends.current()
    cache = layer.compiled_calls
    key = _call_key(layer)
    if key not in cache:
        layer_ref = weakref.ref(layer)  # the cache must not keep it alive

        def call(trainable, non_trainable, inputs):
            outputs, _ = layer_ref().stateless_call(
                trainable, non_trainable, inputs, training=False
            )
            return outputs

        # A code object of its own per compiled call: TensorFlow counts
        # retracing per code object, so layers sharing one would warn.
        name = f"midl_inference_{len(cache)}_{id(layer):x}"
        call = types.FunctionType(
            call.__code__.replace(co_name=name),
            call.__globals__,
            name,
            call.__defaults__,
            call.__closure__,
        )
        cache[key] = module.compile_layer_call(call, static_shapes)
    function = cache[key]
    if function is None:
        return None
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    return lambda inputs: function(trainable, non_trainable, inputs)


class _Selection:
    """`topk_mask(scores, k, method, check_ties_first=True)` as a callable
    with a hashable `key`, for the backends that compile it; those pass
    `rows_per_block` (see `topk_mask`)."""

    def __init__(self, k, method):
        self.k, self.method = k, method
        self.key = (k, method)

    def __call__(self, scores, rows_per_block=None):
        return topk_mask(
            scores,
            self.k,
            method=self.method,
            check_ties_first=True,
            rows_per_block=rows_per_block,
        )


def training_topk_mask(scores, k, method):
    """The training selection, `topk_mask(scores, k, method,
    check_ties_first=True)`, with no gradient: the native kernel's (the
    same mask) where it runs on a CPU (torch; TensorFlow eager and in
    graphs without XLA; JAX as an XLA FFI call), else compiled where the
    backend gains from it (XLA on TensorFlow).

    Returns:
        Float32 tensor of the shape of `scores` holding 0s and 1s.
    """
    backend = backends.current()
    mask = backend.native_topk_mask(scores, k, training=True)
    if mask is None:
        mask = backend.compiled_selection(_Selection(k, method), scores)
    return ops.stop_gradient(mask)


def inference_topk_mask(scores, k, method, check_ties_first):
    """The selection of the masked path outside training: the native
    kernel's where it runs (torch and TensorFlow, eager); else the
    bisection compiled where the backend compiles it (XLA inside
    TensorFlow's graphs: Keras's `predict` at more than 16 rows, where op
    by op it cost a masked layer 0.5x Dense's time at 256 x 4096); else
    `topk_mask(scores, k, method, check_ties_first)`."""
    backend = backends.current()
    mask = backend.native_topk_mask(scores, k, training=False)
    if mask is None and method == "bisection" and check_ties_first:
        mask = backend.compiled_selection(_Selection(k, method), scores)
    if mask is None:
        mask = topk_mask(
            scores, k, method=method, check_ties_first=check_ties_first
        )
    return mask


def straight_through_mix(
    mask,
    logits,
    full,
    light,
    temperature,
    return_frequencies=False,
    training=False,
    bias=None,
    light_bias=None,
):
    """`keras_midl.ops.straight_through_mix` of `full + bias` and `light +
    light_bias` (a bias `None`: none), in the native kernel where it runs
    (a forward and a backward of one C pass each, the biases' adds and
    gradients and the frequencies' gradient included: torch, eager and
    under `torch.compile`; TensorFlow's graphs built with `training`
    true, without XLA), else in `keras.ops`."""
    outputs = backends.current().native_mix(
        mask,
        logits,
        full,
        light,
        temperature,
        return_frequencies=return_frequencies,
        training=training,
        bias=bias,
        light_bias=light_bias,
    )
    if outputs is None:
        if bias is not None:
            full = ops.add(full, bias)
        if light is not None and light_bias is not None:
            light = ops.add(light, light_bias)
        outputs = selection.straight_through_mix(
            mask,
            logits,
            full,
            light,
            temperature=temperature,
            return_frequencies=return_frequencies,
        )
    return outputs
