"""Keras's Dense, EinsumDense and ReversibleEmbedding, able to hold GGUF's block formats.

Each class here is its Keras parent (same arguments, variables, results and class name: Keras
names a layer's entries in ``.weights.h5`` files after its class, so KerasHub's weight files
keep loading) plus one more way to hold its weights: a `keras_llama.quantization.BlockDTypePolicy`
(``"q8_0"``, ``"q4_0"``, ``"q4_1"``), the blocks GGUF files store, kept as they are stored::

    kernel        [out, in] int8 (q8_0) or [out, in / 2] uint8 (4-bit: byte j of a block holds
                  value j in its low nibble, value j + 16 in its high nibble)
    kernel_scale  [out, in / 32] float16 (d)
    kernel_min    [out, in / 32] float16 (m; q4_1 only)

"out" and "in" are the output and input dimensions of the kernel, flattened (an EinsumDense
contracts its leading kernel dimensions); an embedding holds ``embeddings`` [vocabulary,
hidden ...] the same way (and ``reverse_embeddings``, the output projection, when untied).
Calls dequantize (XLA) and multiply: the multi-token products of prefill and scoring. Decoding
multiplies the blocks directly (`keras_llama.kernels.packing` packs them for the native 4-bit
and int8-block kernels), and the embedding lookup dequantizes only the rows it gathers.

Any other policy (float, Keras's int8 / int4) leaves the parent's behaviour untouched.
"""

import math

import keras
from keras import ops

from keras_llama.quantization import BLOCK, BLOCK_FORMATS, block_format_of, quantize_blocks


# --- the blocks, as arrays -----------------------------------------------------------------------
def block_variable_specs(block_format, rows, depth):
    """``[(suffix, shape, dtype)]`` of the variables holding a [rows, depth] matrix."""
    _, block_bytes, has_min = BLOCK_FORMATS[block_format]
    if depth % BLOCK:
        raise ValueError(
            f"Block format {block_format!r} needs an input dimension that is a multiple of "
            f"{BLOCK}. Received: input dimension {depth}"
        )
    groups = depth // BLOCK
    dtype = "int8" if block_format == "q8_0" else "uint8"
    specs = [("", (rows, groups * block_bytes), dtype), ("_scale", (rows, groups), "float16")]
    if has_min:
        specs.append(("_min", (rows, groups), "float16"))
    return specs


def dequantize_rows(block_format, values, scale, minimum=None):
    """Block rows ``values`` [..., in * bits / 8] with ``scale`` (and ``minimum``) [..., in / 32]
    -> float32 [..., in]."""
    lead = tuple(ops.shape(scale)[:-1])
    groups = ops.shape(scale)[-1]
    scale = ops.expand_dims(ops.cast(scale, "float32"), -1)  # [..., G, 1]
    if block_format == "q8_0":
        q = ops.reshape(ops.cast(values, "float32"), (*lead, groups, BLOCK))
        return ops.reshape(q * scale, (*lead, groups * BLOCK))
    b = ops.reshape(ops.cast(values, "int32"), (*lead, groups, BLOCK // 2))
    q = ops.cast(ops.concatenate([ops.bitwise_and(b, 15), ops.right_shift(b, 4)], -1), "float32")
    if block_format == "q4_0":
        w = (q - 8.0) * scale
    else:
        w = q * scale + ops.expand_dims(ops.cast(minimum, "float32"), -1)
    return ops.reshape(w, (*lead, groups * BLOCK))


# --- the shared behaviour --------------------------------------------------------------------------
class _BlockWeights:
    """What the three layers share: building, saving and loading block variables, and
    quantizing float weights into blocks. Each class gives ``_block_build`` its matrices'
    names and [rows, depth] shapes, and ``block_depth``, ``_float_matrices``,
    ``_float_shape`` and ``_drop_float_weights`` for quantizing."""

    def _block_build(self, block_format, prefixes):
        self._block_variables = []
        for prefix, (rows, depth) in prefixes:
            for suffix, shape, dtype in block_variable_specs(block_format, rows, depth):
                variable = self.add_weight(
                    name=prefix + suffix, shape=shape, dtype=dtype, initializer="zeros",
                    trainable=False, autocast=False,
                )  # fmt: skip
                self._block_variables.append(variable)
                setattr(self, "_" + prefix if suffix == "" else prefix + suffix, variable)
        self.inputs_quantizer = None
        self._is_quantized = True

    def _block_matrix(self, prefix, inputs):
        """A held [rows, depth] matrix, dequantized to float32 once ``inputs`` are computed."""
        block_format = block_format_of(self)
        parts = [getattr(self, "_" + prefix), getattr(self, prefix + "_scale")]
        if hasattr(self, prefix + "_min"):
            parts.append(getattr(self, prefix + "_min"))
        return dequantize_rows(block_format, *_after(inputs, parts))

    def save_own_variables(self, store):
        if block_format_of(self) is None or not self.built:
            return super().save_own_variables(store)
        for i, variable in enumerate(self._block_variables):
            store[str(i)] = variable

    def load_own_variables(self, store):
        if block_format_of(self) is None or not self.built:
            return super().load_own_variables(store)
        if len(store.keys()) != len(self._block_variables):
            raise ValueError(
                f"Layer {self.name!r} holds {len(self._block_variables)} block-quantized "
                f"variables; the file has {len(store.keys())} for it."
            )
        for i, variable in enumerate(self._block_variables):
            variable.assign(store[str(i)])

    def quantize(self, mode=None, type_check=True, config=None):
        """Keras's ``quantize`` (Keras refuses subclasses: ``type_check``; these quantize as
        their parents), or, when the layer's policy was just set to a `BlockDTypePolicy`
        (Keras then calls ``quantize``), the float weights into those blocks."""
        block_format = block_format_of(self)
        if block_format is None:
            return super().quantize(mode, type_check=False, config=config)
        if self.block_depth() % BLOCK:
            raise ValueError(
                f"Layer {self.name!r} cannot hold {block_format!r} blocks: its input dimension "
                f"is not a multiple of {BLOCK}. Received: {self.block_depth()}"
            )
        arrays = {}
        for prefix, matrix in self._float_matrices().items():  # [rows, depth] each
            matrix = ops.convert_to_numpy(ops.cast(matrix, "float32"))
            for suffix, array in quantize_blocks(matrix, block_format).items():
                arrays[prefix + suffix] = array
        shape = self._float_shape()
        self._drop_float_weights()
        self.quantized_build(shape, BLOCK_FORMATS[block_format][0])
        for variable in self._block_variables:
            variable.assign(arrays[variable.name])


class _KernelBlocks(_BlockWeights):
    """Dense and EinsumDense: a block-quantized layer calls ``_block_call(inputs)``."""

    def enable_lora(self, rank, *args, **kwargs):
        if block_format_of(self) is not None:
            raise ValueError(
                f"LoRA adapters over block-quantized weights ({block_format_of(self)!r}) are not "
                f"supported: load the float weights instead (e.g. `from_preset(path, "
                f'dtype="float32")` for a GGUF file). Received: layer {self.name!r}'
            )
        return super().enable_lora(rank, *args, **kwargs)

    def _int8_call(self, inputs, training=None):
        if block_format_of(self) is None:
            return super()._int8_call(inputs, training=training)
        return self._block_call(inputs)

    def _int4_call(self, inputs, training=None):
        if block_format_of(self) is None:
            return super()._int4_call(inputs, training=training)
        return self._block_call(inputs)


def _after(inputs, arrays):
    """``arrays`` (block values, scales and mins) with the scales made to depend on
    ``inputs``, so that a layer's float32 weights are made when the layer runs and freed after
    it. Without this, XLA:CPU dequantizes every layer's weights at the start of a program (they
    depend only on its arguments) and holds all of them at once: ~400 MB for SmolLM2-135M's
    prefill. (``lax.optimization_barrier`` does not order them: XLA:CPU removes it before
    scheduling.) The dependency is a zero made from one element of ``inputs`` and added to the
    scales: XLA cannot fold it away, and the scales stay exactly as they are (a non-finite
    element gives 0 too)."""
    if not hasattr(inputs, "shape") or not all(inputs.shape):
        return arrays
    first = ops.reshape(ops.cast(inputs, "float32"), (-1,))[0]
    zero = ops.where(ops.isfinite(first), first * 0.0, 0.0)
    values, scale, *minimum = arrays
    scale = ops.cast(ops.cast(scale, "float32") + zero, scale.dtype)
    return [values, scale, *minimum]


def _finish(layer, x):
    if getattr(layer, "bias", None) is not None:
        x = ops.add(x, layer.bias)
    if layer.activation is not None:
        x = layer.activation(x)
    return x


# --- the layers ------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="keras_llama")
class Dense(_KernelBlocks, keras.layers.Dense):
    """`keras.layers.Dense`, also holding block-quantized kernels (see the module docstring)."""

    def quantized_build(self, kernel_shape, mode, config=None):
        block_format = block_format_of(self)
        if block_format is None:
            return super().quantized_build(kernel_shape, mode, config=config)
        depth, units = kernel_shape
        self._block_build(block_format, [("kernel", (units, depth))])

    def block_depth(self):
        """The input dimension blocks run along."""
        return self._kernel.shape[0]

    def _float_matrices(self):
        return {"kernel": ops.transpose(self._kernel)}

    def _float_shape(self):
        return tuple(self._kernel.shape)

    def _drop_float_weights(self):
        del self._kernel

    def _block_call(self, inputs):
        kernel = ops.cast(ops.transpose(self._block_matrix("kernel", inputs)), self.compute_dtype)
        return _finish(self, ops.matmul(ops.cast(inputs, self.compute_dtype), kernel))


@keras.saving.register_keras_serializable(package="keras_llama")
class EinsumDense(_KernelBlocks, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense`, also holding block-quantized kernels (see the module
    docstring). Block kernels need the contracted dimensions first in the kernel (as in
    ``"bqm,muh->bquh"`` and ``"bqah,ahm->bqm"``)."""

    def quantized_build(self, kernel_shape, mode, config=None):
        block_format = block_format_of(self)
        if block_format is None:
            return super().quantized_build(kernel_shape, mode, config=config)
        contracted = self.contracted_dims()
        self._block_kernel_shape = tuple(kernel_shape)
        depth = math.prod(kernel_shape[:contracted])
        self._block_build(block_format, [("kernel", (math.prod(kernel_shape) // depth, depth))])

    def contracted_dims(self):
        """How many leading kernel dimensions the equation contracts (they must lead)."""
        inputs, output = self.equation.split("->")
        kernel = inputs.split(",")[1]
        contracted = [i for i, letter in enumerate(kernel) if letter not in output]
        if contracted != list(range(len(contracted))):
            raise ValueError(
                f"Block-quantized EinsumDense needs the contracted kernel dimensions first. "
                f"Received: equation={self.equation!r}"
            )
        return len(contracted)

    def block_depth(self):
        """The input dimension blocks run along (the contracted kernel dimensions)."""
        return math.prod(self._kernel.shape[: self.contracted_dims()])

    def _float_matrices(self):
        return {"kernel": ops.transpose(ops.reshape(self._kernel, (self.block_depth(), -1)))}

    def _float_shape(self):
        return tuple(self._kernel.shape)

    def _drop_float_weights(self):
        del self._kernel

    def _block_call(self, inputs):
        kernel = ops.reshape(
            ops.transpose(self._block_matrix("kernel", inputs)), self._block_kernel_shape
        )
        kernel = ops.cast(kernel, self.compute_dtype)
        return _finish(
            self, ops.einsum(self.equation, ops.cast(inputs, self.compute_dtype), kernel)
        )


@keras.saving.register_keras_serializable(package="keras_llama")
class ReversibleEmbedding(_BlockWeights, keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` (same arguments, variables, results and class name)
    that `quantize()` accepts although it is a subclass, also holding a block-quantized table
    (and output projection, when untied): the lookup dequantizes only the gathered rows."""

    def quantized_build(self, embeddings_shape, mode, config=None):
        block_format = block_format_of(self)
        if block_format is None:
            return super().quantized_build(embeddings_shape, mode, config=config)
        table = [("embeddings", (self.input_dim, self.output_dim))]
        if not self.tie_weights:  # the output projection, as GGUF stores it: [vocab, hidden]
            table.append(("reverse_embeddings", (self.input_dim, self.output_dim)))
        self._block_build(block_format, table)

    def _int8_call(self, inputs, reverse=False):
        if block_format_of(self) is None:
            return super()._int8_call(inputs, reverse=reverse)
        return self._block_call(inputs, reverse)

    def _int4_call(self, inputs, reverse=False):
        if block_format_of(self) is None:
            return super()._int4_call(inputs, reverse=reverse)
        return self._block_call(inputs, reverse)

    def block_depth(self):
        """The input dimension blocks run along: the hidden size."""
        return self.output_dim

    def _float_matrices(self):
        matrices = {"embeddings": self._embeddings}
        if not self.tie_weights:  # Keras keeps it [hidden, vocab]
            matrices["reverse_embeddings"] = ops.transpose(self.reverse_embeddings)
        return matrices

    def _float_shape(self):
        return (self.input_dim, self.output_dim)

    def _drop_float_weights(self):
        del self._embeddings
        if not self.tie_weights:
            del self.reverse_embeddings

    def _block_call(self, inputs, reverse):
        if not reverse:  # gather the rows, then dequantize them: never the whole table
            ids = ops.cast(inputs, "int32")
            rows = [ops.take(getattr(self, name), ids, axis=0) for name in
                    ("_embeddings", "embeddings_scale", "embeddings_min") if hasattr(self, name)]  # fmt: skip
            return ops.cast(dequantize_rows(block_format_of(self), *rows), self.compute_dtype)
        table = self._block_matrix(
            "embeddings" if self.tie_weights else "reverse_embeddings", inputs
        )
        logits = ops.matmul(ops.cast(inputs, "float32"), ops.transpose(table))
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return ops.cast(logits, self.compute_dtype)
