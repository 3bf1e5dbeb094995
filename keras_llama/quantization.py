"""Quantization schemes for keras-llama models, built on Keras's own int8/int4 layers.

Schemes, chosen by name in ``model.quantize(mode)``:

======================  ===================================================  ================
mode                    what is quantized                                    activations
======================  ===================================================  ================
``"int8"``              every Dense/EinsumDense kernel (one scale per        float
(recommended)           output channel) and the token embedding (one scale
                        per vocabulary row, which is also the output
                        projection's per-output-channel scale when tied).
                        KerasHub's int8 file layout and dtype policy.
``"int8_weight_only"``  the same as ``"int8"`` (its earlier name, kept)      float
``"int8"`` with         one scale per 32 input values of each output         float
``block_size=32``       channel: GGUF's Q8_0 blocks (``gguf.quants``'s
                        quantizer), held by `keras_llama.models.block_layers`
                        (`quantization_scheme` says ``"q8_0"``)
``"int8"`` with         the same weights, same scales (KerasHub's own        int8, one scale
``quantize_activations  "W8A8" math; `quantization_scheme` says               per token
=True``                 ``"int8_w8a8"``)
``"int4"``              the same weights in int4, blocks of 128 input        float
                        channels with a scale and a zero point each
``"int4_weight_only"``  the same in blocks of 32 (GGUF's Q4_0 / Q4_1 block   float
                        size; Keras's int4 layout and policy ``int4/32``);
                        decoded by the native 4-bit kernels
======================  ===================================================  ================

Why ``"int8"`` computes weight-only: per-token activation quantization (W8A8) rounds every
activation to 8 bits, which costs a small model a visible amount of accuracy. Measured on
SmolLM2-135M-Instruct (six chat prompts, last-token logits against float32, 2026-11-25):

* W8A8 (``quantize_activations=True``, what KerasHub computes for ``"int8"``): cosine
  0.959-0.999, the argmax differs on 1 prompt in 6, and the greedy answer to "What is the
  capital of France?" loses Paris;
* ``"int8"`` (weight-only): cosine >= 0.9988, same argmax everywhere, Paris kept; weight memory
  0.252x float32 (0.409x if the embedding is kept float with ``filters``);
* ``"int4"``: cosine 0.95-0.99, argmax differs on half the prompts (a 135M model has little to
  spare at 4 bits; tolerance in tests: cosine >= 0.9 on a tiny random model).

GGUF files keep their Q8_0 / Q4_0 / Q4_1 weights as stored (`BlockDTypePolicy`, see
`keras_llama.presets.gguf_blocks`; K-quants are re-packed into Q8_0). The native decode
kernels (`keras_llama.kernels.decode_matmul`) read int8 blocks and 4-bit blocks directly:
Q8_0, Q4_0, Q4_1 and ``"int4_weight_only"`` all decode through them.

Pass ``filters`` to `quantize` to keep layers in float, e.g. the embedding:
``model.quantize("int8", filters=lambda layer: layer.name != "token_embedding")``.

How a scheme survives saving: every quantized layer carries a quantized `keras.DTypePolicy`;
the backbone's ``get_config()["dtype"]`` is then a `keras.dtype_policies.DTypePolicyMap` from
layer paths to those policies (the format of KerasHub's int8 presets), so ``from_config`` builds
int8 variables before the weights are loaded. Weight-only int8 layers carry Keras's own int8
policy (``"int8_from_float32"``): the files are KerasHub's, and KerasHub reads them. Keras's
int8 build adds a per-token activation quantizer; `apply_layer_hooks` removes it again after
the layers are built, unless the layer carries an `Int8ActivationsDTypePolicy` (W8A8, chosen
explicitly). Presets written before ``"int8"`` became weight-only carry an
`Int8WeightOnlyDTypePolicy`; they load as ``"int8"``.
"""

import keras
import numpy as np
from keras.dtype_policies import DTypePolicyMap, QuantizedDTypePolicy

from keras_llama.utils import keras_compat

MODES = ("int8", "int8_weight_only", "int4", "int4_weight_only")
INT8_MODES = ("int8", "int8_weight_only")  # the same scheme: weight-only int8
INT4_BLOCK = 32  # "int4_weight_only": values per block (GGUF's Q4_0 / Q4_1 blocks)

# Layer types whose `quantize()` Keras implements (leaf layers holding the kernels).
_QUANTIZABLE_TYPES = (
    keras.layers.Dense,
    keras.layers.EinsumDense,
    keras.layers.Embedding,
)


class _Int8Policy(QuantizedDTypePolicy):
    """Keras's int8 policy under another name (``<prefix>_from_<source>``), so that the two
    never compare equal and a config keeps which one a layer had."""

    prefix = "int8"

    def __init__(self, mode="int8", source_name=None):
        if mode != "int8":
            raise ValueError(
                f"`{type(self).__name__}` only supports mode='int8'. Received: mode={mode!r}"
            )
        super().__init__("int8", source_name)
        self._name = f"{self.prefix}_from_{self._source_name}"


@keras.saving.register_keras_serializable(package="keras_llama")
class Int8ActivationsDTypePolicy(_Int8Policy):
    """Quantized dtype policy of W8A8 layers: int8 kernels with per-output-channel scales and
    int8 activations with one scale per token (Keras's and KerasHub's int8 math), chosen with
    ``quantize("int8", quantize_activations=True)``.

    Keras sees mode ``"int8"``: the layer builds, saves and computes exactly as Keras's int8.
    Layers with Keras's own int8 policy compute weight-only in keras-llama (see the module
    docstring); this policy is what keeps the activation quantizer through saving.

    Args:
        mode: ``"int8"`` (the only mode; the argument keeps `QuantizedDTypePolicy`'s signature).
        source_name: the float policy the layer computes in. Defaults to the global policy.
    """

    prefix = "int8_w8a8"


@keras.saving.register_keras_serializable(package="keras_llama")
class Int8WeightOnlyDTypePolicy(_Int8Policy):
    """The policy presets saved before ``"int8"`` became weight-only carry on their int8
    layers (kept so that they load): int8 kernels with per-output-channel scales, float
    activations, exactly what Keras's own int8 policy now means in keras-llama.

    Args:
        mode: ``"int8"`` (the only mode; the argument keeps `QuantizedDTypePolicy`'s signature).
        source_name: the float policy the layer computes in. Defaults to the global policy.
    """

    prefix = "int8_weight_only"


# Block formats (GGUF's): format -> (Keras mode, bytes per 32 values, has a per-block minimum).
BLOCK = 32
BLOCK_FORMATS = {"q8_0": ("int8", 32, False), "q4_0": ("int4", 16, False),
                 "q4_1": ("int4", 16, True)}  # fmt: skip


@keras.saving.register_keras_serializable(package="keras_llama")
class BlockDTypePolicy(QuantizedDTypePolicy):
    """Quantized dtype policy of layers holding weights in GGUF's block formats, as stored:
    per output row, blocks of 32 input values with a float16 scale ``d`` (and minimum ``m``):

    ===========  ======================================  ==============================
    format       ``kernel`` [out, in * bits / 8]         value
    ===========  ======================================  ==============================
    ``"q8_0"``   int8, one per value                     ``d * q``
    ``"q4_0"``   uint8, byte j of a block: value j in    ``d * (q - 8)``
                 its low nibble, value j + 16 in its
                 high nibble (GGUF's byte order)
    ``"q4_1"``   the same                                ``d * q + m``
    ===========  ======================================  ==============================

    with ``kernel_scale`` (and ``kernel_min``) float16 [out, in / 32] beside it (for an
    embedding: ``embeddings`` [vocabulary, hidden ...], ``embeddings_scale``, ...). Keras sees
    mode ``"int8"`` or ``"int4"``; the layers of `keras_llama.models.block_layers` build,
    compute, save and load these variables.

    Args:
        mode: the Keras mode (``"int8"`` for q8_0, ``"int4"`` for the 4-bit formats).
        source_name: the float policy the layer computes in. Defaults to the global policy.
        block_format: ``"q8_0"``, ``"q4_0"`` or ``"q4_1"``.
    """

    def __init__(self, mode="int8", source_name=None, block_format="q8_0"):
        if block_format not in BLOCK_FORMATS or BLOCK_FORMATS[block_format][0] != mode:
            raise ValueError(
                f"Unknown block format, or a Keras mode that does not go with it. Expected one "
                f"of { ({f: m[0] for f, m in BLOCK_FORMATS.items()}) }. Received: "
                f"block_format={block_format!r}, mode={mode!r}"
            )
        super().__init__(mode, source_name)
        self.block_format = block_format
        self._name = f"{block_format}_from_{self._source_name}"

    def get_config(self):
        return {**super().get_config(), "block_format": self.block_format}


# Bytes of one GGUF block: (scale, minimum, values) byte ranges (ggml-common.h).
_BLOCK_FIELDS = {"q8_0": ((0, 2), None, (2, 34)), "q4_0": ((0, 2), None, (2, 18)),
                 "q4_1": ((0, 2), (2, 4), (4, 20))}  # fmt: skip


def split_blocks(blocks, block_format):
    """GGUF blocks ``blocks`` uint8 [rows, G, bytes per block] -> ``{"": values, "_scale":
    float16 [rows, G], "_min": float16 [rows, G] (q4_1)}``, the variables a block layer holds
    (values int8 [rows, 32 G] for q8_0, uint8 [rows, 16 G] for the 4-bit formats), bit for bit.
    """
    rows = blocks.shape[0]
    scale, minimum, values = _BLOCK_FIELDS[block_format]
    arrays = {
        "": blocks[..., values[0] : values[1]].reshape(rows, -1),
        "_scale": blocks[..., scale[0] : scale[1]].copy().view(np.float16)[..., 0],
    }
    if minimum is not None:
        arrays["_min"] = blocks[..., minimum[0] : minimum[1]].copy().view(np.float16)[..., 0]
    if block_format == "q8_0":
        arrays[""] = arrays[""].view(np.int8)
    return arrays


def quantize_blocks(matrix, block_format):
    """A float matrix [rows, depth] (depth a multiple of 32) in ``block_format``, quantized by
    ``gguf.quants`` (ggml's reference quantizers) and split as `split_blocks`."""
    import gguf

    kind = getattr(gguf.GGMLQuantizationType, block_format.upper())
    raw = gguf.quants.quantize(np.asarray(matrix, np.float32), kind)
    return split_blocks(raw.reshape(raw.shape[0], matrix.shape[1] // BLOCK, -1), block_format)


def block_policy(block_format, source_name=None):
    """The `BlockDTypePolicy` of ``block_format``."""
    mode = BLOCK_FORMATS[block_format][0] if block_format in BLOCK_FORMATS else None
    return BlockDTypePolicy(mode, source_name, block_format)


def block_format_of(layer):
    """A layer's block format (``"q8_0"``, ``"q4_0"``, ``"q4_1"``), or None."""
    return getattr(resolved_policy(layer), "block_format", None)


def check_mode(mode, quantize_activations=False, block_size=None):
    """Raise a clear error unless ``mode`` names a scheme of `MODES` (and
    ``quantize_activations`` and ``block_size`` are only asked of int8)."""
    if block_size is not None and (block_size != BLOCK or mode not in INT8_MODES):
        raise ValueError(
            f"`block_size` applies to mode='int8' / 'int8_weight_only' and must be {BLOCK} "
            f"(GGUF's Q8_0 blocks). Received: block_size={block_size!r}, mode={mode!r}"
        )
    if block_size is not None and quantize_activations:
        raise ValueError("`block_size` quantizes weights only: `quantize_activations=True` "
                         "cannot be combined with it.")  # fmt: skip
    if mode not in MODES:
        raise ValueError(
            f"Unknown quantization mode. Expected one of {MODES}. Received: mode={mode!r}"
        )
    if quantize_activations and mode != "int8":
        raise ValueError(
            "`quantize_activations=True` (per-token int8 activations, W8A8) applies to "
            f"mode='int8' only. Received: mode={mode!r}"
        )


def keras_mode_and_config(mode, quantize_activations=False):
    """The Keras ``(mode, config)`` pair implementing one of our `MODES`."""
    check_mode(mode, quantize_activations)
    if mode in INT8_MODES and not quantize_activations:
        return "int8", keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    if mode == "int4_weight_only":
        return "int4", keras.quantizers.Int4QuantizationConfig(block_size=INT4_BLOCK)
    return mode, None


def layer_filter(mode):
    """A predicate on layers: those the scheme ``mode`` quantizes."""
    check_mode(mode)

    def keep(layer):
        return isinstance(layer, _QUANTIZABLE_TYPES)

    return keep


def resolved_policy(layer):
    """A layer's own dtype policy, looked up by its path when it holds a `DTypePolicyMap`."""
    policy = layer.dtype_policy
    if isinstance(policy, DTypePolicyMap):
        policy = policy[layer.path] if layer.path else policy.default_policy
    return policy


def is_int8_weight_only(layer):
    """True for an int8 layer that computes with float activations (every int8 policy but
    `Int8ActivationsDTypePolicy`)."""
    policy = resolved_policy(layer)
    return policy.quantization_mode == "int8" and not isinstance(
        policy, (Int8ActivationsDTypePolicy, BlockDTypePolicy)
    )


def int4_block_size(layer):
    """The block size of a Keras int4 layer (a positive int), or None (per channel, or not
    int4)."""
    policy = resolved_policy(layer)
    if policy.quantization_mode != "int4":
        return None
    block_size = getattr(policy, "block_size", None)
    return block_size if block_size is not None and block_size > 0 else None


def mark_activations_quantized(layer):
    """Give a freshly W8A8-quantized layer the `Int8ActivationsDTypePolicy` (kept in configs)."""
    policy = resolved_policy(layer)
    layer.dtype_policy = Int8ActivationsDTypePolicy(
        source_name=keras_compat.policy_source_name(policy)
    )


def apply_layer_hooks(layer):
    """Restore what a dtype policy cannot express through Keras's own build: float activations
    for weight-only int8 layers (Keras's int8 build adds a per-token quantizer), and for int4
    layers (the int4 ReversibleEmbedding built from a policy, without the config `quantize`
    had, quantizes its reverse projection's inputs by default)."""
    if is_int8_weight_only(layer):
        layer.inputs_quantizer = None
        layer.quantization_config = keras.quantizers.Int8QuantizationConfig(
            activation_quantizer=None
        )
    elif resolved_policy(layer).quantization_mode == "int4" or block_format_of(layer):
        layer.inputs_quantizer = None


def quantization_mode_of(model):
    """The scheme a model was quantized with (``"int8"``, ``"int8_w8a8"`` for int8 with
    quantized activations, ``"int4"``, ``"int4_weight_only"``, a block format such as
    ``"q4_1"``, or a Keras mode for layers quantized some other way), or None for a float
    model. Mixed schemes (a GGUF file's Q4_1 projections and Q8_0 embedding) give the one most
    layers have."""
    schemes = [_scheme(layer) for layer in keras_compat.sublayers(model)
               if getattr(layer, "_is_quantized", False)]  # fmt: skip
    return max(schemes, key=schemes.count) if schemes else None


def _scheme(layer):
    policy = resolved_policy(layer)
    if isinstance(policy, Int8ActivationsDTypePolicy):
        return "int8_w8a8"
    if isinstance(policy, BlockDTypePolicy):
        return policy.block_format
    if int4_block_size(layer) == INT4_BLOCK:
        return "int4_weight_only"
    return policy.quantization_mode


def quantized_policy_map(model, default_policy):
    """A `DTypePolicyMap` with the policy of every quantized layer of ``model``, or None."""
    quantized = [
        layer for layer in keras_compat.sublayers(model) if getattr(layer, "_is_quantized", False)
    ]
    if not quantized:
        return None
    policy_map = DTypePolicyMap(default_policy=default_policy)
    for layer in quantized:
        policy_map[layer.path] = resolved_policy(layer)
    return policy_map
