"""PyTorch: the native kernel (with an autograd function where gradients
are recorded), `torch.compile` of the gathered path where the native
kernel cannot run, and the selection and straight-through mix in C
(eager, direct calls and an autograd function; under `torch.compile`, the
operators `keras_midl::topk_mask` and `keras_midl::mix`)."""

import types
import warnings

import torch
from keras import ops

from keras_midl import config
from keras_midl.backend import WEIGHT_NAMES
from keras_midl.backend import generic
from keras_midl.native import build
from keras_midl.native import kernels

FLOAT32_TINY = 1.1754944e-38  # smallest normal float32
_compiled = {}
_failed = []


# The same as on a backend without a module of its own.
read_value = generic.read_value
compile_layer_call = generic.compile_layer_call
compiled_selection = generic.compiled_selection


def in_trace(inputs):
    """Whether torch records the call (`torch.compile`, `torch.jit.trace`),
    where the native kernel, an opaque C call, cannot be recorded."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def exporting():
    """Whether `torch.jit.trace` (the ONNX exporter) records the call: it
    freezes data-dependent branches and records no custom gradient."""
    return torch.jit.is_tracing()


def matmul_transposed(inputs, kernel):
    """`inputs @ kernel^T` for a kernel stored as `(units, input_dim)`:
    BLAS reads the transposed kernel in place. The form of the other
    backends, `(kernel @ rows^T)^T`, leaves a non-contiguous output that
    the elementwise ops after it read more slowly."""
    return ops.matmul(inputs, ops.transpose(kernel))


def conv_kernel(kernel):
    """A convolution kernel `(*spatial, c_in, c_out)` as `ops.conv` takes
    it; in half precision with one output channel, a copy laid out so
    that the view Keras passes to PyTorch, `(c_out, c_in, *spatial)`, is
    contiguous.

    With `c_out = 1` that view's strides also read as channels-last, so
    Keras passes it on uncopied, and PyTorch's CPU convolution in float16
    (`slow_conv2d`, where oneDNN takes no float16) fails in the backward
    pass: "grad_weight must be contiguous". MIDLConv2D's light
    convolution has one output channel at rank 1 (seen under
    `mixed_float16` on an AMD EPYC with torch 2.13, not on an Intel
    Xeon). Other kernels, and float32 ones, are returned as they are.
    """
    if kernel.shape[-1] != 1:
        return kernel
    kernel = ops.convert_to_tensor(kernel)
    if kernel.dtype not in (torch.float16, torch.bfloat16):
        return kernel
    spatial = kernel.ndim - 2
    # Keras's permutation to PyTorch's layout, and its inverse.
    order = (spatial + 1, spatial, *range(spatial))
    inverse = tuple(order.index(axis) for axis in range(kernel.ndim))
    return kernel.permute(order).contiguous().permute(inverse)


def native_forward(inputs, weights, k, quantize_inputs=True):
    """The gathered forward in the native kernel; `None` where it cannot
    run (tensors not on the CPU, neither float32 nor the int8 kernel of a
    quantized layer; an int8 layer where a gradient is recorded).

    Where no gradient is recorded (`torch.no_grad()`, `predict`), the
    whole forward is one C call (`midl_sparse_forward`, or
    `midl_sparse_forward_int8`; `quantize_inputs` as in
    `keras_midl.native.sparse_forward`). Otherwise the gate logits and the
    light path come from torch's matmuls, and the selection and the
    selected dot products from `midl_select_gather`, an autograd function
    (float kernels only). The kernel runs on torch's intra-op thread count
    (`intra_op_threads`).
    """
    cpu = torch.device("cpu")
    tensors = [inputs, *weights.values()]
    if any(
        t is not None and t.device != cpu for t in tensors
    ) or inputs.dtype != torch.float32 or not generic.native_dtypes(
        weights,
        lambda t: t.dtype == torch.float32,
        lambda t: t.dtype == torch.int8,
    ):
        return None
    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    rows = inputs.reshape(-1, input_dim)
    recording = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )
    if recording:
        if weights.get("kernel_scale") is not None:
            return None  # the keras.ops int8 path has the custom gradient
        outputs = _recorded_forward(rows, weights, k)
    else:
        outputs = _forward(rows, weights, k, quantize_inputs)
    return outputs.reshape(*inputs.shape[:-1], units)


def _forward(rows, weights, k, quantize_inputs=True):
    """`kernels.sparse_forward` on torch tensors, without a copy."""
    rows = rows.contiguous()
    addresses, kept = {}, []  # `kept`: the tensors live until the call
    for name in kernels.FORWARD_WEIGHTS:
        tensor = weights[name]
        if tensor is not None:  # `data_ptr` needs no `detach`
            kept.append(tensor.contiguous())
            addresses[name] = kept[-1].data_ptr()
    units, dim = weights["kernel"].shape
    count = rows.shape[0]
    outputs = torch.empty((count, units), dtype=torch.float32)
    selected = torch.empty((count, k), dtype=torch.int64)
    if count:
        kernels.sparse_forward_pointers(
            rows.data_ptr(),
            count,
            dim,
            addresses,
            weights["projection"].shape[1],
            units,
            k,
            outputs.data_ptr(),
            selected.data_ptr(),
            quantize_inputs=quantize_inputs,
            threads=intra_op_threads(),
        )
    return outputs


def intra_op_threads():
    """The threads torch's ops run on (`torch.get_num_threads()`:
    `torch.set_num_threads`, else `$OMP_NUM_THREADS`, else one per core),
    which the native kernel takes too; never more than the CPUs this
    process may run on."""
    return max(1, min(torch.get_num_threads(), kernels.available_cpus()))


def _recorded_forward(rows, weights, k):
    code = rows @ weights["projection"]
    logits = code @ weights["gate_kernel"] + weights["gate_bias"]
    if weights["light_kernel"] is None:
        base = torch.zeros_like(logits)
    else:
        base = code @ weights["light_kernel"]
        if weights["light_bias"] is not None:
            base = base + weights["light_bias"]
    return SelectGather.apply(
        logits, rows, weights["kernel"], weights["bias"], base, k
    )


class SelectGather(torch.autograd.Function):
    """The native selection and gather as an autograd function.

    Forward: the light path `base`, with the `k` neurons `topk_mask` picks
    from `logits` replaced by `rows . kernel[j] + bias[j]`. Backward, in
    torch ops: that of this selection held fixed (no gradient to the
    logits, as the hard mask has none).
    """

    @staticmethod
    def forward(ctx, logits, rows, kernel, bias, base, k):
        logits = logits.detach().contiguous()
        rows, kernel = rows.contiguous(), kernel.contiguous()
        # Held by a name until the C call returns (a temporary's buffer
        # would be freed before it).
        bias_values = None if bias is None else bias.detach().contiguous()
        units, dim = kernel.shape
        outputs = base.detach().clone(memory_format=torch.contiguous_format)
        selected = torch.empty((rows.shape[0], k), dtype=torch.int64)
        if rows.shape[0]:
            kernels.select_gather_pointers(
                logits.data_ptr(),
                units,
                kernel.data_ptr(),
                dim,
                rows.data_ptr(),
                rows.shape[0],
                k,
                0 if bias_values is None else bias_values.data_ptr(),
                outputs.data_ptr(),
                selected.data_ptr(),
                threads=intra_op_threads(),
            )
        ctx.save_for_backward(rows, kernel, selected)
        ctx.has_bias = bias is not None
        return outputs

    @staticmethod
    def backward(ctx, grad):
        rows, kernel, selected = ctx.saved_tensors
        grad_values = grad.gather(1, selected)
        flat = selected.reshape(-1)
        grad_rows = grad_kernel = grad_bias = grad_base = None
        if ctx.needs_input_grad[1]:
            grad_rows = torch.einsum(
                "bk,bkd->bd", grad_values, kernel[selected]
            )
        if ctx.needs_input_grad[2]:
            outer = grad_values[:, :, None] * rows[:, None, :]
            grad_kernel = torch.zeros_like(kernel).index_add_(
                0, flat, outer.reshape(-1, kernel.shape[1])
            )
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = torch.zeros(
                kernel.shape[0], dtype=grad.dtype
            ).index_add_(0, flat, grad_values.reshape(-1))
        if ctx.needs_input_grad[4]:
            grad_base = grad.scatter(1, selected, 0.0)
        return None, grad_rows, grad_kernel, grad_bias, grad_base, None


def _native_ready(*tensors):
    """Whether the native training kernels take these tensors: the
    library loaded, every tensor a float32 CPU tensor of one shape, and
    the call not recorded by `torch.jit.trace` (the ONNX exporter, which
    has no operator for them). `torch.compile` records them as the
    custom operators `keras_midl::topk_mask` and `keras_midl::mix`."""
    if not config.native_kernels_enabled() or build.library() is None:
        return False
    if torch.jit.is_tracing():
        return False
    shape = tensors[0].shape
    cpu = torch.device("cpu")
    return all(
        t is None or (
            t.dtype == torch.float32 and t.device == cpu and t.shape == shape
        )
        for t in tensors
    )


def native_topk_mask(scores, k, training):
    """`keras_midl.ops.topk_mask(scores, k)` in one C call (the same mask,
    bit for bit), with no gradient, in training or not; `None` where the
    kernel cannot run (see `_native_ready`). Its `top_k` and the half
    dozen elementwise passes around it took 5-7 ms at 256 x 1024 here,
    the C call 0.7-1.0 ms (the runs at 10cdd2f and 150434c,
    `benchmarks/results/selection/`).
    Under `torch.compile` it is the operator `keras_midl::topk_mask`;
    eager, the call itself (the operator's dispatch cost 55 us a call
    here)."""
    if not _native_ready(scores) or scores.ndim == 0:
        return None
    if torch.compiler.is_compiling():
        return topk_mask_op(scores.detach(), k)
    return _topk_mask(scores.detach(), k)


@torch.library.custom_op("keras_midl::topk_mask", mutates_args=())
def topk_mask_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`midl_topk_mask` as a torch operator (float32, CPU)."""
    return _topk_mask(scores, k)


def _topk_mask(scores, k):
    """`midl_topk_mask` on torch tensors."""
    scores = scores.contiguous()
    mask = torch.empty_like(scores)
    if mask.numel():
        units = scores.shape[-1]
        kernels.topk_mask_pointers(
            scores.data_ptr(), mask.numel() // units, units, k,
            mask.data_ptr(), threads=intra_op_threads(),
        )
    return mask


@topk_mask_op.register_fake
def _(scores, k):
    return torch.empty_like(scores)


def native_mix(
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
    """`keras_midl.ops.straight_through_mix` of `full + bias` and `light
    + light_bias` with a forward and a backward of one C pass each, in
    training or not (`training` is not needed here); `None` where the
    kernel cannot run (see `_native_ready`). Under `torch.compile` it is
    the operator `keras_midl::mix`; eager, an autograd function on the
    same C calls (`EagerMix`: the operator's dispatch and autograd
    wrapper cost 0.15-0.27 ms a layer's step here, at 256 x 1024).

    The value is `where(mask, full + bias, light + light_bias)`; the
    gradients `d_full = mask * g`, `d_light = (1 - mask) * g`, `d_logits
    = (g * ((full + bias) - (light + light_bias)) + d_f / rows) * a * (1
    - a) / temperature`, `a = sigmoid(logits / temperature)` (torch's),
    `d_f` the gradient of the selection frequencies where they are
    returned (`return_frequencies`), and the biases' the sums of `d_full`
    and `d_light` over the rows. In torch ops the mix and its gradient
    are eight passes over the tensors, and `torch.where` is the slowest
    of them on a CPU; the frequencies' own straight-through gradient
    (`balance_loss`) four more, the biases' adds and sums four more."""
    if not _native_ready(full, mask, logits, light):
        return None
    biases = [None if b is None else _bias_tensor(b)
              for b in (bias, light_bias)]
    if not all(b is None or _native_bias(b, full) for b in biases):
        return None
    bias, light_bias = biases
    if light is None:
        light_bias = None
    mix = mix_op if torch.compiler.is_compiling() else EagerMix.apply
    outputs, frequencies = mix(
        mask.detach(),
        logits,
        full,
        light,
        bias,
        light_bias,
        float(temperature),
        bool(return_frequencies),
    )
    return (outputs, frequencies) if return_frequencies else outputs


def _bias_tensor(bias):
    """A bias as a tensor: a Keras variable's value (the parameter that
    gets the gradient), a tensor as it is."""
    return bias if isinstance(bias, torch.Tensor) else bias.value


def _native_bias(bias, full):
    """Whether the C mixes take `bias` for `full`: a float32 CPU vector of
    `full`'s last axis."""
    return (
        bias.dtype == torch.float32
        and bias.device == torch.device("cpu")
        and tuple(bias.shape) == (full.shape[-1],)
    )


@torch.library.custom_op("keras_midl::mix", mutates_args=())
def mix_op(
    mask: torch.Tensor,
    logits: torch.Tensor,
    full: torch.Tensor,
    light: torch.Tensor | None,
    bias: torch.Tensor | None,
    light_bias: torch.Tensor | None,
    temperature: float,
    frequencies: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`midl_mix` as a torch operator (float32, CPU, one shape; the
    biases `None` or of the last axis): the outputs and, with
    `frequencies`, the mask's mean over the rows (an empty tensor
    without)."""
    return _mix(mask, full, light, bias, light_bias, frequencies)


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _address(tensor):
    return 0 if tensor is None else tensor.data_ptr()


def _mix(mask, full, light, bias, light_bias, frequencies):
    """`mix_op` on torch tensors."""
    mask, full, light, bias, light_bias = _contiguous(
        mask, full, light, bias, light_bias
    )
    outputs = torch.empty_like(full)
    if outputs.numel():
        kernels.mix_pointers(
            mask.data_ptr(),
            full.data_ptr(),
            _address(light),
            outputs.numel(),
            outputs.data_ptr(),
            bias=_address(bias),
            light_bias=_address(light_bias),
            units=full.shape[-1],
        )
    if not frequencies:
        return outputs, full.new_empty((0,))
    return outputs, mask.reshape(-1, mask.shape[-1]).mean(0)


@mix_op.register_fake
def _(mask, logits, full, light, bias, light_bias, temperature, frequencies):
    units = full.shape[-1] if frequencies else 0
    return torch.empty_like(full), full.new_empty((units,))


@torch.library.custom_op("keras_midl::mix_backward", mutates_args=())
def mix_backward_op(
    upstream: torch.Tensor,
    mask: torch.Tensor,
    soft: torch.Tensor,
    full: torch.Tensor,
    light: torch.Tensor | None,
    bias: torch.Tensor | None,
    light_bias: torch.Tensor | None,
    temperature: float,
    column: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """`midl_mix_backward` as a torch operator: `(d_full, d_light,
    d_logits, d_bias, d_light_bias)`, `d_light` and `d_light_bias` empty
    where `light` or `light_bias` is `None`, `d_bias` where `bias` is;
    `column` (one float per unit, or `None`) is added to each row before
    the slope."""
    return _mix_gradients(
        upstream, mask, soft, full, light, bias, light_bias, temperature,
        column,
    )


def _bias_gradients(full, light, bias, light_bias):
    """Zeros for `d_bias` and `d_light_bias` (the sums of no rows), or
    empty tensors where there is no such bias."""
    units = full.shape[-1]
    d_bias = full.new_zeros((units,) if bias is not None else (0,))
    has_light_bias = light is not None and light_bias is not None
    d_light_bias = full.new_zeros((units,) if has_light_bias else (0,))
    return d_bias, d_light_bias


def _mix_gradients(
    upstream, mask, soft, full, light, bias, light_bias, temperature, column
):
    """`mix_backward_op` on torch tensors."""
    upstream, soft, mask, full, light, bias, light_bias, column = (
        _contiguous(
            upstream, soft, mask, full, light, bias, light_bias, column
        )
    )
    d_full, d_logits = torch.empty_like(full), torch.empty_like(full)
    d_light = full.new_empty((0,)) if light is None else torch.empty_like(full)
    d_bias, d_light_bias = _bias_gradients(full, light, bias, light_bias)
    if full.numel():
        kernels.mix_backward_pointers(
            upstream.data_ptr(),
            mask.data_ptr(),
            soft.data_ptr(),
            full.data_ptr(),
            _address(light),
            full.numel(),
            temperature,
            d_full.data_ptr(),
            0 if light is None else d_light.data_ptr(),
            d_logits.data_ptr(),
            column=_address(column),
            units=full.shape[-1],
            bias=_address(bias),
            light_bias=_address(light_bias),
            d_bias=d_bias.data_ptr() if d_bias.numel() else 0,
            d_light_bias=(
                d_light_bias.data_ptr() if d_light_bias.numel() else 0
            ),
        )
    return d_full, d_light, d_logits, d_bias, d_light_bias


@mix_backward_op.register_fake
def _(upstream, mask, soft, full, light, bias, light_bias, temperature,
      column):
    d_light = full.new_empty((0,)) if light is None else torch.empty_like(full)
    d_bias, d_light_bias = _bias_gradients(full, light, bias, light_bias)
    return (torch.empty_like(full), d_light, torch.empty_like(full),
            d_bias, d_light_bias)


def _mix_setup_context(ctx, inputs, output):
    (mask, logits, full, light, bias, light_bias, temperature,
     frequencies) = inputs
    ctx.save_for_backward(mask, logits, full, light, bias, light_bias)
    ctx.temperature = temperature
    ctx.frequencies = frequencies


def _mix_backward(ctx, upstream, d_frequencies, gradients=mix_backward_op):
    """The gradients of `mix_op`'s inputs, from `gradients`, the operator
    `mix_backward_op` or, eager, its function."""
    mask, logits, full, light, bias, light_bias = ctx.saved_tensors
    temperature = ctx.temperature
    scaled = logits if temperature == 1.0 else logits / temperature
    column = None
    if ctx.frequencies and d_frequencies is not None:
        rows = max(1, full.numel() // full.shape[-1])
        column = (d_frequencies / rows).to(full.dtype)
    d_full, d_light, d_logits, d_bias, d_light_bias = gradients(
        upstream, mask, torch.sigmoid(scaled), full, light, bias,
        light_bias, temperature, column,
    )
    d_light = None if light is None else d_light
    d_bias = None if bias is None else d_bias
    d_light_bias = None if light_bias is None else d_light_bias
    return (None, d_logits, d_full, d_light, d_bias, d_light_bias, None,
            None)


mix_op.register_autograd(_mix_backward, setup_context=_mix_setup_context)


class EagerMix(torch.autograd.Function):
    """`mix_op` as an autograd function on the same C calls, for eager
    calls: the operator's dispatch and its autograd wrapper are for
    `torch.compile`, and cost eager steps more than the C passes save."""

    @staticmethod
    def forward(ctx, mask, logits, full, light, bias, light_bias,
                temperature, frequencies):
        outputs = _mix(mask, full, light, bias, light_bias, frequencies)
        inputs = (mask, logits, full, light, bias, light_bias, temperature,
                  frequencies)
        _mix_setup_context(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, upstream, d_frequencies):
        return _mix_backward(
            ctx, upstream, d_frequencies, gradients=_mix_gradients
        )


def native_select_mix_runs(inputs):
    """Whether `native_select_mix` may run on a call on `inputs`: the
    library loaded, the call neither traced nor compiled, no gradient
    recorded (`torch.no_grad()`, `predict`: where one may be, the masked
    path runs, whose mix has the gate's gradient) and float32 inputs on
    the CPU."""
    return (
        config.native_kernels_enabled()
        and build.library() is not None
        and not in_trace(inputs)
        and not torch.is_grad_enabled()
        and inputs.dtype == torch.float32
        and inputs.device == torch.device("cpu")
    )


def native_select_mix(logits, k, full, bias, light, light_bias):
    """The masked path's inference output from its gate logits and its
    two paths before their biases, in one C pass (`midl_select_mix`):
    `full + bias` at the `k` neurons `topk_mask` selects, `light +
    light_bias` (0 without `light`) elsewhere, written over `full`,
    which the caller computed for this call. The same values as the
    masked path, bit for bit, without its mask and its three passes
    (two bias adds, the mix), each of which writes a tensor of the
    output's size. `None` where a tensor is not float32 on the CPU;
    called where `native_select_mix_runs` holds."""
    if not _native_ready(full, logits, light):
        return None
    # `_native_ready` checked the tensors of `full`'s shape; the biases
    # are vectors.
    biases = [None if t is None else t.detach().contiguous()
              for t in (bias, light_bias)]
    if not all(t is None or _native_bias(t, full) for t in biases):
        return None
    bias, light_bias = biases
    light = None if light is None else light.detach().contiguous()
    units = full.shape[-1]
    logits, full = logits.contiguous(), full.contiguous()
    if full.numel():
        kernels.select_mix_pointers(
            logits.data_ptr(),
            full.numel() // units,
            units,
            k,
            full.data_ptr(),
            *map(_address, (bias, light, light_bias)),
            threads=intra_op_threads(),
        )
    return full


def torch_forward(
    inputs,
    kernel,
    bias,
    projection,
    gate_kernel,
    gate_bias,
    light_kernel,
    light_bias,
    kernel_scale,
    k,
):
    """The gathered forward in torch ops, for `torch.compile`.

    Selection as `keras_midl.ops.topk_mask` (NaN lowest, subnormals as
    zero, ties to the lowest index), then the indices of the mask by a
    second `topk` over `mask * (n - position)`.
    """
    code = inputs @ projection
    logits = code.float() @ gate_kernel + gate_bias
    logits = torch.where(torch.isnan(logits), float("-inf"), logits)
    logits = torch.where(logits.abs() < FLOAT32_TINY, 0.0, logits)
    units = logits.shape[-1]
    threshold = torch.topk(logits, k, sorted=False).values.amin(
        -1, keepdim=True
    )
    above = logits > threshold
    tied = (logits == threshold).to(torch.int32)
    needed = k - above.to(torch.int32).sum(-1, keepdim=True)
    mask = above | ((tied > 0) & (torch.cumsum(tied, -1) <= needed))
    order = units - torch.arange(units, device=logits.device)
    selected = torch.topk(
        mask.to(logits.dtype) * order.to(logits.dtype), k, sorted=False
    ).indices
    weights = kernel[selected].to(inputs.dtype)  # fused, never materialized
    values = (weights * inputs[:, None, :]).sum(-1)
    if kernel_scale is not None:
        values = values / kernel_scale[selected].to(inputs.dtype)
    if bias is not None:
        values = values + bias[selected]
    if light_kernel is None:
        base = torch.zeros_like(logits, dtype=inputs.dtype)
    else:
        base = code @ light_kernel
        if light_bias is not None:
            base = base + light_bias
    return base.scatter(1, selected, values)


def _compile(function):
    """`torch.compile(function)`; a seam for tests."""
    return torch.compile(function)


def _compiled_function(key):
    """A compiled `torch_forward` of its own code object per layer shape:
    `torch.compile` keeps its graphs (and its recompile limit) per code
    object, so layers of different shapes do not evict each other's."""
    function = _compiled.get(key)
    if function is None:
        code = torch_forward.__code__
        name = "midl_gathered_" + "_".join(str(part) for part in key)
        name = "".join(c if c.isalnum() else "_" for c in name)
        copy = types.FunctionType(
            code.replace(co_name=name), torch_forward.__globals__, name
        )
        function = _compiled[key] = _compile(copy)
    return function


def compiled_gathered(inputs, weights, k):
    """The gathered forward of a float32 layer through `torch.compile`
    (inductor), compiled lazily on the first call, one function per layer
    shape; a batch of one row gets its own graph, the other row counts
    share one dynamic graph. Inside a caller's `torch.compile` it is
    traced inline. `None` where it cannot run (native kernels off, a
    compile failure, after one warning), so the caller runs `keras.ops`.
    """
    if _failed or not config.native_kernels_enabled():
        return None
    kernel = weights["kernel"]
    units, input_dim = kernel.shape
    rows = inputs.to(torch.float32).reshape(-1, input_dim)
    if rows.shape[0] == 0:
        return None
    arguments = [rows, *(weights.get(name) for name in WEIGHT_NAMES)]
    if torch.compiler.is_compiling():
        outputs = torch_forward(*arguments, k)
        return outputs.reshape(*inputs.shape[:-1], units)
    if rows.shape[0] > 1:
        torch._dynamo.mark_dynamic(rows, 0)
    key = (k, units, input_dim) + tuple(
        weights.get(name) is None for name in WEIGHT_NAMES
    )
    try:
        outputs = _compiled_function(key)(*arguments, k)
    except Exception as error:  # no compiler, no inductor, ...
        _failed.append(error)
        warnings.warn(
            "keras_midl: torch.compile failed for the gathered inference "
            f"path ({type(error).__name__}: {error}); MIDL runs its "
            "keras.ops path instead, which is slower than Dense. Call "
            "keras_midl.config.disable_native_kernels() or set "
            f"{config.COMPILE_ENV}=0 to skip compiling.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return outputs.reshape(*inputs.shape[:-1], units)


