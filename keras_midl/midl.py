"""The Matrix-Interpolated Dropout Layer (MID-L)."""

import keras
from keras import activations
from keras import constraints
from keras import dtype_policies
from keras import initializers
from keras import ops
from keras import quantizers
from keras import regularizers

from keras_midl import backend
from keras_midl._checks import is_finite_number
from keras_midl._checks import is_integer
from keras_midl.gating import GatedLayer
from keras_midl.gating import num_selected
from keras_midl.lowrank import default_rank
from keras_midl.lowrank import from_dense
from keras_midl.ops import dispatch
from keras_midl.ops.selection import frequency_balance_loss
from keras_midl.ops.selection import selection_frequencies
from keras_midl.ops.selection import straight_through


def _int8_dot_jax(inputs, kernel):
    """`inputs @ kernel^T` of int8 operands as XLA's int8 dot with int32
    sums (what `einsum` of int8 operands lowers to on JAX, as in Keras's
    int8 Dense), in float32.

    At 8 x 4096 @ 4096 it took 1.6 ms here against 20 ms for float32 sums
    (whose cast of the whole kernel dominates). XLA's int8
    matrix-vector product, for a single row, is about 20x slower than its
    two-row matrix product (22 ms against 1.0 ms at 4096 x 4096): a
    single row is computed with a zero row added.
    """
    units, input_dim = kernel.shape
    rows = ops.reshape(inputs, (-1, input_dim))
    count = rows.shape[0]
    if count == 1:
        rows = ops.concatenate([rows, ops.zeros_like(rows)], axis=0)
    sums = ops.einsum("bd,nd->bn", rows, kernel)[:count]
    outputs = ops.reshape(sums, (*inputs.shape[:-1], units))
    return ops.cast(outputs, "float32")


def _check_lora_rank(rank, name):
    if not is_integer(rank) or rank < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={rank!r}"
        )


def _check_lora_alpha(lora_alpha):
    if not is_finite_number(lora_alpha):
        raise ValueError(
            "Received an invalid value for `lora_alpha`, expected None or a "
            f"finite number. Received: lora_alpha={lora_alpha!r}"
        )


@keras.saving.register_keras_serializable(package="keras_midl")
class MIDL(GatedLayer):
    """Matrix-Interpolated Dropout Layer: a Dense layer with learned top-k
    neuron selection.

    For each input row `x` a gate picks the `k` most informative of the
    `units` output neurons. Those get the full transformation `x W + b`; the
    others get a cheap low-rank one, `(x V) U + b_lite`:

    ```
    z      = x V                       # low-rank code, V: (d, r)
    s      = z G + c                   # gate logits,   G: (r, n)
    h_lite = z U + b_lite              # light path,    U: (r, n)
    h_full = x W + b                   # full path,     W: (d, n)
    m      = topk_mask(s + noise, k)   # exactly k ones per row
    a      = sigmoid(s / temperature)
    g      = m + a - stop_gradient(a)  # value m, gradient of a
    output = activation(g * h_full + (1 - g) * h_lite)
    ```

    that is `activation(M(x) x + bias)` with the per-input interpolated
    matrix `M(x) = diag(g) W + (I - diag(g)) U V`. The gradient of the mask
    is the straight-through estimate through `sigmoid(s / temperature)`, so
    `V`, `G`, `c`, `U` and `W` all train end to end. With `k_ratio=1` the
    layer computes exactly `activation(x W + b)`, a Dense layer.

    In training the layer also adds a load-balancing loss to
    `layer.losses`, `balance_weight * var_j(f_j) / (k/n)^2` with `f_j` the
    fraction of the batch's rows whose mask selects neuron `j`.

    These equations are this project's reading of the paper, whose authors
    published no code.

    Inference multiply-adds per row: `d*r + 2*r*n + k*d` (gate and light
    path included) against `d*n` for Dense, when only the `k` selected
    neurons' full path is computed (`inference_path="gathered"`). The
    masked path computes `x W` for every neuron and saves no time.

    The full-path kernel is stored as `W^T`, of shape `(units, input_dim)`,
    so that the weights of one neuron are one contiguous row: the gathered
    path reads `k` rows. To copy weights from a `Dense` layer, transpose its
    kernel.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((784,)),
    ...     keras_midl.MIDL(512, k_ratio=0.45, activation="relu"),
    ...     keras.layers.Dense(10, activation="softmax"),
    ... ])
    >>> model.compile("adam", "sparse_categorical_crossentropy")
    >>> model.predict(np.zeros((2, 784)), verbose=0).shape
    (2, 10)

    Args:
        units: Positive integer, dimensionality of the output space.
        k_ratio: Float in `(0, 1]`, fraction of the units computed by the
            full path for each input; `k = max(1, round(k_ratio * units))`.
            `layer.k_ratio` can be set later (validated, and `layer.k`
            follows); `layer.k` itself is read-only.
        rank: Positive integer, rank `r` of the low-rank code shared by the
            gate and the light path. `None` uses `default_rank(d, units)`:
            the largest rank <= 32 whose gate and light path cost at most
            10% of the Dense layer's `d * units` multiply-adds.
        light_path: `"lowrank"` (default) for `h_lite = z U + b_lite`, or
            `"zero"` for `h_lite = 0`: unselected neurons output
            `activation(0)`, a learned input-dependent dropout.
        temperature: Positive finite float, temperature of the sigmoid
            whose gradient the straight-through estimator uses. It changes
            the gradients, not the forward pass.
        gate_noise: Non-negative finite float, standard deviation of
            Gaussian noise added to the gate logits before selection, in
            training only.
        balance_weight: Non-negative finite float, weight of the load
            balancing loss added in training (`layer.losses`): the squared
            coefficient of variation of the neurons' selection
            frequencies over the batch, `var_j(f_j) / (k/n)^2` with
            `f_j` the fraction of rows that select neuron `j` (its
            gradient is the straight-through one). It pulls neurons that
            are never or always selected back towards `k/n`: without it,
            10-20% of the neurons of a layer were never selected after
            training on CIFAR-10 and IMDB (`benchmarks/results/
            paper_table_remedies_cifar10.md`, `..._imdb.md`). `0` adds
            no loss.
        activation: Activation function, as for `Dense`.
        use_bias: Boolean, whether the full and light paths have biases
            `b` and `b_lite`. The gate bias `c` always exists.
        kernel_initializer: Initializer of `W`, `V`, `G` and `U`. Each
            weight gets its own draw, also from a seeded initializer (a
            seed derived per weight, so the layer stays reproducible).
        bias_initializer: Initializer of `b`, `b_lite` and `c`, one draw
            each as for `kernel_initializer`.
        kernel_regularizer: Regularizer applied to `W`, `V`, `G` and `U`.
        bias_regularizer: Regularizer applied to `b` and `b_lite`.
        activity_regularizer: Regularizer applied to the output.
        kernel_constraint: Constraint applied to `W`, `V`, `G` and `U`.
        bias_constraint: Constraint applied to `b` and `b_lite`.
        selection: How the top-k mask is found: `"top_k"` or
            `"bisection"`; both give the same mask (see
            `keras_midl.ops.topk_mask`). `None` picks the faster one
            for the current backend. Where the native kernel runs on a
            CPU (eager PyTorch, `torch.compile`, eager TensorFlow and
            its training graphs without XLA) the mask comes from its C
            selection instead, the same mask bit for bit.
        inference_path: How the full path is computed outside training
            (training always uses the masked path); all give the same
            outputs up to float rounding. `"masked"`: one matmul `x W` for
            all `units`, then the 0/1 mask. `"gathered"`: for each input
            row, only the `k` selected rows of `W^T` are read and their
            `k` dot products computed: in a native C kernel in eager calls
            on a CPU, in `keras.ops` (which exports) inside traces, such
            as Keras's `predict`, a `tf.function` or `jax.jit`. `"auto"`:
            gathered where that was measured faster than masked, by the
            rule `keras_midl.ops.dispatch.use_gathered_path` (rows,
            `input_dim * units`, `k_ratio`, backend, eager or traced),
            else masked. The rule for where the native kernel runs is in
            `keras_midl.ops.dispatch`; `keras_midl.config` turns it off.
        seed: Integer, seed of the gate noise.
        lora_rank: Optional positive integer. If set, `build` calls
            `enable_lora(lora_rank, lora_alpha)`: the full-path kernel is
            frozen and fine-tuned through a low-rank update (LoRA), as
            `Dense(lora_rank=...)` does. See `enable_lora`.
        lora_alpha: Optional number, the scale of the LoRA update is
            `lora_alpha / lora_rank`; `None` means `lora_rank`.
        quantization_config: Optional `keras.quantizers.QuantizationConfig`,
            as for `Dense` (see `quantize`).
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Call arguments:
        inputs: Tensor of shape `(..., input_dim)`, rank >= 2.
        training: Python boolean; gate noise is added only when `True`.

    Input shape:
        N-D tensor with shape `(batch_size, ..., input_dim)`.

    Output shape:
        N-D tensor with shape `(batch_size, ..., units)`.

    Dtypes: the gate (`G`, `c`, the logits, the selection and the sigmoid)
    and the code `z = x V` that feeds it run in `gate_dtype`: float32
    under 16-bit and mixed policies, so the selection sees no float16
    overflow or bfloat16 ties, and float64 in a float64 layer. The paths
    and the output are in the compute dtype. `call` and `gate()` share
    one computation of the gate, so `gate(x)["mask"]` is the mask `call`
    uses, under every policy.

    An empty batch (a leading axis of size 0) gives an empty output of
    shape `(0, ..., units)`, as `Dense` does.

    Non-finite inputs propagate as in `Dense`: a row containing NaN or inf
    gives non-finite outputs for that row. Its NaN gate logits rank lowest,
    so its mask still has exactly `k` ones, and other rows are unaffected.

    Reference:
        Shaeri & Middel, "MID-L: Matrix-Interpolated Dropout Layer with
        Layer-wise Neuron Selection", arXiv:2505.11416.
    """

    def __init__(
        self,
        units,
        k_ratio=0.5,
        rank=None,
        light_path="lowrank",
        temperature=1.0,
        gate_noise=0.0,
        balance_weight=0.1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        selection=None,
        inference_path="masked",
        seed=None,
        lora_rank=None,
        lora_alpha=None,
        quantization_config=None,
        **kwargs,
    ):
        super().__init__(activity_regularizer=activity_regularizer, **kwargs)
        if not is_integer(units) or units <= 0:
            raise ValueError(
                "Received an invalid value for `units`, expected a positive "
                f"integer. Received: units={units!r}"
            )
        self._set_gate_arguments(
            k_ratio=k_ratio,
            rank=rank,
            light_path=light_path,
            temperature=temperature,
            gate_noise=gate_noise,
            balance_weight=balance_weight,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            selection=selection,
            inference_path=inference_path,
            seed=seed,
        )
        if lora_rank is not None:
            _check_lora_rank(lora_rank, "lora_rank")
        if lora_alpha is not None:
            _check_lora_alpha(lora_alpha)
        self.units = units
        # As in `Dense`: `lora_alpha` defaults to the rank.
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else lora_rank
        self.lora_enabled = False
        self.quantization_config = quantization_config
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    @property
    def k(self):
        """Neurons on the full path per row, `num_selected(k_ratio, units)`;
        read-only (set `k_ratio` instead)."""
        return num_selected(self._k_ratio, self.units)

    @k.setter
    def k(self, value):
        raise AttributeError(
            f"`k` of layer {self.name} is read-only: it is derived from "
            f"`k_ratio` and `units`. Set `layer.k_ratio` instead (in "
            f"(0, 1]). Received: k={value!r}"
        )

    def build(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                f"Layer {self.name} expects inputs of rank >= 2, of shape "
                f"(batch_size, ..., input_dim). Received: "
                f"input_shape={input_shape}"
            )
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"Layer {self.name} needs the last axis of its inputs "
                "(input_dim) to be defined, e.g. shape (batch_size, 784). "
                f"Received: input_shape={input_shape}"
            )
        rank = self.rank or default_rank(input_dim, self.units)
        self.effective_rank = rank
        self.input_dim = input_dim

        # Each weight gets its own draw (see `initializer_for`).
        kernel, bias = self._weight_makers(self.units)

        if self.quantization_mode is None:
            self.kernel = kernel("kernel", (self.units, input_dim))
        elif self.quantization_mode == "int8":
            self._int8_build((self.units, input_dim), self.quantization_config)
        else:
            raise self._quantization_mode_error(self.quantization_mode)
        self.bias = bias("bias") if self.use_bias else None
        # The gate, from the code `x V` on, stays in float32 under mixed
        # precision (see the docstring and `_gate_outputs`).
        self.projection = kernel("projection", (input_dim, rank), False)
        self.gate_kernel = kernel("gate_kernel", (rank, self.units), False)
        self.gate_bias = bias("gate_bias", regularized=False, autocast=False)
        if self.light_path == "lowrank":
            self.light_kernel = kernel("light_kernel", (rank, self.units))
            self.light_bias = bias("light_bias") if self.use_bias else None
        else:
            self.light_kernel = None
            self.light_bias = None
        self.input_spec = keras.layers.InputSpec(
            min_ndim=2, axes={-1: input_dim}
        )
        if self.lora_rank:
            # As `Dense`; `enable_lora` needs the layer marked built.
            self.built = True
            self.enable_lora(self.lora_rank, lora_alpha=self.lora_alpha)

    def gate_logits(self, code):
        """Gate logits `s = z G + c` in `gate_dtype`, from the low-rank code."""
        dtype = self.gate_dtype
        logits = ops.matmul(
            ops.cast(code, dtype), ops.cast(self.gate_kernel, dtype)
        )
        return ops.add(logits, ops.cast(self.gate_bias, dtype))

    def gate(self, inputs, training=False):
        """Computes the gate for a batch, without the paths.

        The same computation as in `call` (`_gate_outputs`), so `"mask"` is
        the selection `call` makes for these inputs, under every dtype
        policy.

        Example:

        >>> layer = keras_midl.MIDL(8, k_ratio=0.25)
        >>> layer.build((None, 5))
        >>> gate = layer.gate(np.ones((3, 5)))
        >>> keras.ops.convert_to_numpy(gate["mask"]).sum(axis=-1)
        array([2., 2., 2.], dtype=float32)

        Args:
            inputs: Tensor of shape `(..., input_dim)`.
            training: Whether to add the gate noise before selection.

        Returns:
            Dict with `"logits"` (`s`), `"mask"` (`m`, 0/1, exactly `k`
            ones per row) and `"probabilities"` (`sigmoid(s /
            temperature)`), each of shape `(..., units)` and dtype
            `gate_dtype`.

        Raises:
            ValueError: If the layer is not built.
        """
        self._require_built("gate()")
        _, logits, mask = self._gate_outputs(
            ops.convert_to_tensor(inputs), training
        )
        return {
            "logits": logits,
            "mask": mask,
            "probabilities": self._gate_probabilities(logits),
        }

    def _gate_outputs(self, inputs, training):
        """The gate as `call` and `gate()` both compute it.

        Returns `(code, logits, mask)`: the code `z = x V` in the compute
        dtype (for the light path), the logits `s` and the 0/1 mask (with
        the gate noise when training) in `gate_dtype`.

        The inputs are rounded to the compute dtype, as `call` receives
        them; from there on the gate is computed in `gate_dtype`, `z`
        included (`V` is not autocast), and `z` is rounded to the compute
        dtype only for the light path. No 16-bit value whose rounding a
        compiler may skip (XLA's excess precision) feeds the selection, so
        `gate()`, run op by op, finds the mask that `call` finds eagerly or
        compiled.
        """
        code, logits = self._gate_code_and_logits(inputs)
        mask = ops.cast(self._select(logits, training), self.gate_dtype)
        return code, logits, mask

    def _gate_code_and_logits(self, inputs):
        """`(z, s)` of `_gate_outputs`, without the selection."""
        dtype = self.gate_dtype
        inputs = ops.cast(inputs, self.compute_dtype)
        gate_code = ops.matmul(
            ops.cast(inputs, dtype), ops.cast(self.projection, dtype)
        )
        logits = self.gate_logits(gate_code)
        return ops.cast(gate_code, self.compute_dtype), logits

    def call(self, inputs, training=None):
        if not training:
            # The inference path (keras_midl/ops/dispatch.py): the native
            # kernel, the gathered path, a compiled eager call, or `None`
            # for the masked path below.
            outputs = dispatch.inference(self, inputs)
            if outputs is not None:
                return outputs
        return self.masked_outputs(inputs, training=training)

    def masked_outputs(self, inputs, training=None):
        """The masked path: the full path for every neuron, then the mask
        (the training path, and the reference of the others)."""
        code, logits, mask = self._gate_outputs(inputs, training)
        balanced = bool(training) and self.balance_weight > 0
        outputs = self._interpolate(
            mask,
            logits,
            self._full_path(inputs),
            self._light_path(code),
            return_frequencies=balanced,
            training=bool(training),
        )
        if balanced:
            outputs, frequencies = outputs
            self.add_loss(self._balance_loss(frequencies))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def unbiased_paths(self, inputs):
        """`(logits, x W, z U)` of a float layer: the gate logits and the
        full and light paths before their biases, as `masked_outputs`
        computes them (`z U` is `None` with `light_path="zero"`), for the
        native inference mix (`keras_midl.ops.dispatch`)."""
        code, logits = self._gate_code_and_logits(inputs)
        return logits, self._full_path(inputs), self._light_path(code)

    def _full_path(self, inputs):
        """`x W` for every neuron, in the compute dtype, before the bias
        (`_interpolate` adds it); with LoRA, `W` is `W + lora_alpha /
        lora_rank * A B` (`enable_lora`)."""
        if self.quantization_mode == "int8":
            full = self._int8_full_path(inputs)
            if self.lora_enabled:
                # As `Dense._int8_call`: the update from the float inputs.
                code = ops.matmul(
                    ops.cast(inputs, self.compute_dtype), self.lora_kernel_a
                )
                update = ops.matmul(code, self.lora_kernel_b)
                full = ops.cast(
                    ops.add(full, self.lora_scale * update),
                    self.compute_dtype,
                )
        elif self.lora_enabled:
            # As `Dense.kernel`: the update merged into the kernel.
            kernel = ops.cast(
                ops.add(self.kernel, self._lora_update()), self.compute_dtype
            )
            full = backend.current().matmul_transposed(inputs, kernel)
        else:
            full = backend.current().matmul_transposed(inputs, self.kernel)
        return full

    def _light_path(self, code):
        """`z U` before the bias (`_interpolate` adds it), or `None` with
        `light_path="zero"`."""
        if self.light_kernel is None:
            return None
        return ops.matmul(code, self.light_kernel)

    def _interpolate(
        self, mask, logits, full, light, return_frequencies, training
    ):
        """`g * (full + b) + (1 - g) * (light + b_lite)`, `g` the
        straight-through gate, and with `return_frequencies` the
        selection frequencies for the balance loss
        (`keras_midl.ops.straight_through_mix`); `full` and `light` come
        without their biases.

        Its value is `where(mask, full + b, light + b_lite)`, computed as
        one select with a custom gradient (`straight_through_mix`), which
        also takes the frequencies' gradient to the logits; where the
        native mix runs, the biases are added in the same pass and their
        gradients summed in its backward pass. The gate gets its gradient
        whenever one is taken, in training or not (a subclassed model
        that does not pass `training` on still trains its gates).
        """
        if backend.current().exporting():
            # The tracing exporters record no custom gradient: the same
            # values with plain ops.
            if self.bias is not None:
                full = ops.add(full, self.bias)
            if light is not None and self.light_bias is not None:
                light = ops.add(light, self.light_bias)
            soft = self._gate_probabilities(logits)
            gate = ops.cast(straight_through(mask, soft), self.compute_dtype)
            outputs = gate * full
            if light is not None:
                outputs = outputs + (1 - gate) * light
            if return_frequencies:
                return outputs, selection_frequencies(mask, soft)
            return outputs
        return dispatch.straight_through_mix(
            mask,
            logits,
            full,
            light,
            self.temperature,
            return_frequencies=return_frequencies,
            training=training,
            bias=self.bias,
            light_bias=self.light_bias,
        )

    def _balance_loss(self, frequencies):
        """`balance_weight * var_j(f_j) / (k/n)^2`, `f_j` the fraction of
        rows selecting neuron `j` (`keras_midl.ops.selection.
        frequency_balance_loss`), whose straight-through gradient, that
        of the mean sigmoid, the mix takes to the logits."""
        return frequency_balance_loss(frequencies, self.k, self.balance_weight)

    # --- LoRA (low-rank adaptation of the full-path kernel), as in Dense --

    def enable_lora(
        self,
        rank,
        lora_alpha=None,
        a_initializer="he_uniform",
        b_initializer="zeros",
    ):
        """Freezes the full-path kernel and fine-tunes it by LoRA, as
        `Dense.enable_lora` does.

        Adds two trainable weights, `lora_kernel_a` of shape `(input_dim,
        rank)` and `lora_kernel_b` of shape `(rank, units)` (the shapes
        and initializers of `Dense`'s), and sets `kernel.trainable =
        False`. The full path then computes with `W + lora_alpha / rank *
        A B`; as the kernel is stored as `W^T`, `(units, input_dim)`, the
        update is added to it as `(A B)^T`; `layer.kernel` stays the
        frozen variable (`Dense.kernel` returns the merged kernel, MIDL's
        is never `Dense`'s layout anyway). Every inference path uses it
        (the masked path, training included, and the gathered path,
        which adds the update of the `k` selected neurons only); the
        native kernel does not, so eager calls take the `keras.ops` or
        compiled paths instead (`keras_midl.ops.dispatch`).

        Only the full-path kernel is frozen, as `Dense` freezes only its
        kernel: the bias, the gate (`projection`, `gate_kernel`,
        `gate_bias`) and the light path stay trainable (at most about 10%
        of `W`'s size with the default rank); set their `trainable` to
        `False` to train the LoRA weights alone. Call `model.compile`
        again after enabling LoRA on a model that was compiled.

        On an int8 layer (`quantize("int8")` before or after this call) the
        kernel stays int8 and the update is added in float from the float
        inputs, as in `Dense`. Saving (`model.save`, `save_weights`) merges
        the update into the saved kernel (for int8: dequantized, merged and
        quantized again), as `Dense` does; a loaded layer has LoRA enabled
        with `lora_kernel_b` zeroed, so its update is zero until it
        trains again (`Dense` zeroes both weights, whose gradients then
        stay zero; here `lora_kernel_a` keeps the draw of its initializer).

        Example:

        >>> layer = keras_midl.MIDL(16, k_ratio=0.5)
        >>> layer.build((None, 8))
        >>> layer.enable_lora(2)
        >>> [w.name for w in layer.trainable_weights if "lora" in w.name]
        ['lora_kernel_a', 'lora_kernel_b']
        >>> layer.kernel.trainable
        False
        >>> layer.get_config()["lora_rank"], layer.get_config()["lora_alpha"]
        (2, 2)

        Args:
            rank: Positive integer, the rank of the update.
            lora_alpha: Number, the update is scaled by `lora_alpha /
                rank`; `None` means `rank` (a scale of 1).
            a_initializer: Initializer of `lora_kernel_a`.
            b_initializer: Initializer of `lora_kernel_b`; the default
                zeros make the update start at zero.

        Raises:
            ValueError: If `rank` is not a positive integer, `lora_alpha`
                not a finite number, the layer is not built, LoRA is
                already enabled, or the layer has a `kernel_constraint`
                (as in `Dense`, which cannot constrain `W + A B`).
        """
        _check_lora_rank(rank, "rank")
        if lora_alpha is not None:
            _check_lora_alpha(lora_alpha)
        if self.kernel_constraint:
            raise ValueError(
                "Lora is incompatible with kernel constraints. "
                "In order to enable lora on this layer, remove the "
                "`kernel_constraint` argument."
            )
        if not self.built:
            raise ValueError(
                f"Cannot enable lora on layer {self.name}: it isn't yet "
                "built. Call the layer on inputs, or call "
                "`layer.build(input_shape)`, first."
            )
        if self.lora_enabled:
            raise ValueError(
                f"lora is already enabled on layer {self.name}. This can "
                "only be done once per layer."
            )
        # In float32 (float64 in a float64 layer) under every policy, as
        # `Dense` keeps them in float32: no 16-bit underflow in training.
        dtype = self.gate_dtype
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            self.lora_kernel_a = self.add_weight(
                name="lora_kernel_a",
                shape=(self.input_dim, rank),
                initializer=initializers.get(a_initializer),
                dtype=dtype,
                regularizer=self.kernel_regularizer,
            )
            self.lora_kernel_b = self.add_weight(
                name="lora_kernel_b",
                shape=(rank, self.units),
                initializer=initializers.get(b_initializer),
                dtype=dtype,
                regularizer=self.kernel_regularizer,
            )
        finally:
            if locked:
                self._tracker.lock()
        self.kernel.trainable = False
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = lora_alpha if lora_alpha is not None else rank
        # The compiled eager calls were traced without LoRA.
        self._compiled_calls.clear()

    @property
    def lora_scale(self):
        """`lora_alpha / lora_rank`, the scale of the LoRA update (read at
        each call, so `lora_alpha` can be changed); `None` without LoRA."""
        if not self.lora_enabled:
            return None
        return self.lora_alpha / self.lora_rank

    def _lora_update(self):
        """`lora_alpha / lora_rank * (A B)^T`: the LoRA update in the
        kernel's `(units, input_dim)` layout."""
        update = ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
        return self.lora_scale * ops.transpose(update)

    # --- Conversion and int8 quantization (Keras's quantization protocol) --

    @classmethod
    def from_dense(
        cls, layer, k_ratio=0.5, rank=None, gate_init="lowrank", **kwargs
    ):
        """A built MIDL layer initialized from a built `Dense` layer.

        The full path is the Dense layer (`W`, transposed to this layer's
        `(units, input_dim)` layout, and `b`); `V` and `U` are the
        truncated-SVD factors of `W` with the singular values split
        between them (`V = P_r sqrt(S_r)`, `U = sqrt(S_r) Q_r^T`), so
        `z U` is the best rank-`r` approximation of `x W`, and
        `b_lite = b`. With `gate_init="lowrank"` the gate starts as
        `G = U`, `c = b`: it picks the neurons with the largest approximate
        pre-activation. Activation, bias use, initializers, regularizers,
        constraints and the dtype policy are the Dense layer's.

        Example:

        >>> dense = keras.layers.Dense(64, activation="relu")
        >>> dense.build((None, 32))
        >>> layer = keras_midl.MIDL.from_dense(dense, k_ratio=1.0, rank=8)
        >>> x = np.random.rand(2, 32).astype("float32")
        >>> np.allclose(
        ...     keras.ops.convert_to_numpy(layer(x)),
        ...     keras.ops.convert_to_numpy(dense(x)),
        ...     atol=1e-5,
        ... )
        True

        Args:
            layer: A built `keras.layers.Dense` (not quantized, no LoRA).
            k_ratio: The MIDL layer's `k_ratio`.
            rank: `r`, at most `min(input_dim, units)`; `None` uses
                `default_rank(input_dim, units)`.
            gate_init: `"lowrank"` (`G = U`, `c = b`) or `"random"` (this
                layer's own initializers).
            **kwargs: Other MIDL arguments (`name`, `light_path`,
                `inference_path`, ...), not those taken from `layer`.

        Returns:
            A built `MIDL` layer.
        """
        return from_dense(cls, layer, k_ratio, rank, gate_init, **kwargs)

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the full-path kernel in place; Keras's PTQ protocol.

        Only `mode="int8"`: `W` is stored as int8 with one scale per neuron
        (absmax over its `input_dim` weights); as in `Dense`, the inputs
        of the full path are quantized per row (unless `config` says
        otherwise). The gate, projection and light path stay in float.
        Usually called through `model.quantize("int8")`.

        With LoRA enabled (`enable_lora`), as in `Dense`, the frozen kernel
        `W` alone is quantized and the LoRA weights stay in float: the
        full path is the int8 one plus the float update.
        """
        if type_check and type(self) is not MIDL:
            raise self._not_implemented_error(self.quantize)
        if mode != "int8":
            raise NotImplementedError(
                f"Layer {self.__class__.__name__} supports the quantization "
                f"mode 'int8' only. Received: mode={mode!r}"
            )
        self.quantization_config = config
        kernel_value, kernel_scale = self._quantized_kernel(self.kernel)
        kernel_shape = tuple(self.kernel.shape)
        del self.kernel
        self._int8_build(kernel_shape, config)
        self.kernel.assign(kernel_value)
        self.kernel_scale.assign(kernel_scale)
        # The compiled eager calls were traced with the float kernel.
        self._compiled_calls.clear()
        # Set before the policy, so that its setter does not quantize again.
        self._is_quantized = True
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = dtype_policies.get(
                f"{mode}_from_{self.dtype_policy.name}"
            )

    def _quantized_kernel(self, kernel):
        """`(int8 values, scale of shape (units,))` of a float kernel, by
        the weight quantizer of `quantization_config` (default: absmax over
        each neuron's `input_dim` weights)."""
        quantizer = quantizers.QuantizationConfig.weight_quantizer_or_default(
            self.quantization_config, quantizers.AbsMaxQuantizer(axis=-1)
        )
        kernel_value, kernel_scale = quantizer(kernel, to_numpy=True)
        if tuple(kernel_scale.shape) != (self.units, 1):
            raise ValueError(
                "MIDL stores its kernel as (units, input_dim) and needs one "
                "scale per neuron: the weight quantizer must reduce axis -1. "
                f"Received: scale shape {tuple(kernel_scale.shape)}"
            )
        return kernel_value, ops.squeeze(kernel_scale, axis=-1)

    def _int8_build(self, kernel_shape, config=None):
        self.inputs_quantizer = (
            quantizers.QuantizationConfig.activation_quantizer_or_default(
                config, quantizers.AbsMaxQuantizer()
            )
        )
        self.kernel = self.add_weight(
            name="kernel",
            shape=kernel_shape,
            initializer="zeros",
            dtype="int8",
            trainable=False,
        )
        self.kernel_scale = self.add_weight(
            name="kernel_scale",
            shape=(self.units,),
            initializer="ones",
            trainable=False,
        )
        self._is_quantized = True

    def _int8_call(self, inputs, training=None):
        # Same computation as `call`; its full path reads the int8 kernel
        # (`_int8_full_path` when masked; `ops.gathered` when gathered).
        return self.call(inputs, training=training)

    def _int8_full_path(self, inputs):
        """`x W` from the int8 kernel, with Dense's custom gradient."""

        @ops.custom_gradient
        def full_path(inputs, kernel, kernel_scale):
            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                float_kernel = ops.divide(
                    ops.cast(kernel, self.compute_dtype),
                    ops.expand_dims(kernel_scale, -1),
                )
                return (ops.matmul(upstream, float_kernel), None, None)

            scale = kernel_scale
            if self.inputs_quantizer:
                inputs, inputs_scale = self.inputs_quantizer(inputs, axis=-1)
                scale = ops.multiply(scale, inputs_scale)
            if keras.backend.backend() == "jax" and inputs.dtype == "int8":
                outputs = _int8_dot_jax(inputs, kernel)
            else:
                # The integer products summed in float32: the same sums
                # as int32 up to float32 rounding (exact below 2**24);
                # int8 matmuls were 2-6x slower than float32 ones on
                # TensorFlow and PyTorch CPUs here.
                outputs = backend.current().matmul_transposed(
                    ops.cast(inputs, "float32"), ops.cast(kernel, "float32")
                )
            outputs = ops.cast(outputs, self.compute_dtype)
            return ops.divide(outputs, scale), grad_fn

        return full_path(
            inputs,
            ops.convert_to_tensor(self.kernel),
            ops.convert_to_tensor(self.kernel_scale),
        )

    @property
    def variable_serialization_spec(self):
        """Variable names saved by `save_own_variables`, in order, per
        quantization mode (`None`: float). Absent ones (no bias, no light
        path) are skipped. The float order is the order `build` creates
        them, so files saved before this method existed still load."""
        names = [
            name
            for name in dispatch.WEIGHT_NAMES
            if name != "kernel_scale"
        ]
        return {None: names, "int8": names + ["kernel_scale"]}

    def _serialized_variables(self):
        """`(name, variable)` of the saved variables, in order."""
        mode = self.quantization_mode
        if mode not in self.variable_serialization_spec:
            raise self._quantization_mode_error(mode)
        names = self.variable_serialization_spec[mode]
        pairs = [(name, getattr(self, name, None)) for name in names]
        return [(name, v) for name, v in pairs if v is not None]

    def _merged_lora_kernel(self):
        """The kernel (and `kernel_scale` for int8) with the LoRA update
        merged in, as `Dense` saves them: `{name: NumPy array}`, empty
        without LoRA. An int8 kernel is dequantized, merged and quantized
        again by the layer's weight quantizer."""
        if not self.lora_enabled:
            return {}
        # float32, or float64 in a float64 layer.
        dtype = self.gate_dtype
        update = ops.cast(self._lora_update(), dtype)
        if self.quantization_mode == "int8":
            kernel = ops.divide(
                ops.cast(self.kernel, dtype),
                ops.expand_dims(ops.cast(self.kernel_scale, dtype), -1),
            )
            value, scale = self._quantized_kernel(ops.add(kernel, update))
            return {
                "kernel": ops.convert_to_numpy(value),
                "kernel_scale": ops.convert_to_numpy(scale),
            }
        merged = ops.cast(ops.add(self.kernel, update), self.kernel.dtype)
        return {"kernel": ops.convert_to_numpy(merged)}

    def save_own_variables(self, store):
        """Saves the variables of `variable_serialization_spec`; with LoRA
        enabled the kernel is saved with the update merged in (the LoRA
        weights are not saved), as `Dense` does."""
        if not self.built:
            return
        merged = self._merged_lora_kernel()
        for index, (name, variable) in enumerate(
            self._serialized_variables()
        ):
            store[str(index)] = merged.get(name, variable)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` saved. With LoRA enabled (a
        `lora_rank` in the config) `lora_kernel_b` is zeroed: the loaded
        kernel holds the update already."""
        if not self.built:
            return
        variables = [v for _, v in self._serialized_variables()]
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' expected {len(variables)} variables, "
                f"but received {len(store.keys())} variables during loading. "
                f"Expected: {[v.name for v in variables]}"
            )
        for index, variable in enumerate(variables):
            variable.assign(store[str(index)])
        if self.lora_enabled:
            self.lora_kernel_b.assign(ops.zeros(self.lora_kernel_b.shape))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def inference_multiply_adds(self, input_dim=None):
        """Multiply-adds per input row at inference: `d*r + 2*r*n + k*d`.

        The gate (`d*r + r*n`), the light path (`r*n`, absent with
        `light_path="zero"`) and the full path of the `k` selected neurons
        (`k*d`). Bias additions and the O(n) selection are not counted, as
        for Dense's `d*n`, nor LoRA weights (merged into the kernel when
        the layer is saved).

        Args:
            input_dim: `d`; defaults to the built layer's input size.

        Raises:
            ValueError: If `input_dim` is not given and the layer is not
                built.
        """
        if input_dim is None:
            self._require_built("inference_multiply_adds()")
        d = input_dim if input_dim is not None else self.input_dim
        r = self.rank or default_rank(d, self.units)
        light = r * self.units if self.light_path == "lowrank" else 0
        return d * r + r * self.units + light + self.k * d

    def get_config(self):
        base_config = super().get_config()
        config = {
            "units": self.units,
            "k_ratio": self.k_ratio,
            "rank": self.rank,
            "light_path": self.light_path,
            "temperature": self.temperature,
            "gate_noise": self.gate_noise,
            "balance_weight": self.balance_weight,
            "activation": activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(
                self.kernel_regularizer
            ),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(
                self.activity_regularizer
            ),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "selection": self.selection,
            "inference_path": self.inference_path,
            "seed": self.seed,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "quantization_config": keras.saving.serialize_keras_object(
                self.quantization_config
            ),
        }
        return {**base_config, **config}

    @classmethod
    def from_config(cls, config):
        config = config.copy()
        config["quantization_config"] = keras.saving.deserialize_keras_object(
            config.get("quantization_config", None)
        )
        return super().from_config(config)

