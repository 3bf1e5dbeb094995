"""Llama building blocks: the token embedding, RMS norm and rotary embedding.

The attention layer is in `llama_attention`, the decoder block in `llama_decoder`. Layer and
attribute names follow KerasHub's so that KerasHub ``model.weights.h5`` files load as they are
(the weight paths are derived from them).
"""

import math

import keras
from keras import ops

from keras_llama.models.block_layers import ReversibleEmbedding  # noqa: F401 (re-exported)
from keras_llama.utils.validation import check_positive_number


def kernel_initializer(stddev=0.02):
    return keras.initializers.RandomNormal(stddev=stddev)


def clone_initializer(initializer):
    """A fresh copy of ``initializer``: each layer draws its own values."""
    return initializer.__class__.from_config(initializer.get_config())


ROPE_ARGUMENTS = (
    "rope_max_wavelength",
    "rope_scaling_factor",
    "rope_frequency_adjustment_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_pretraining_sequence_length",
)


def rope_config(layer):
    """The rotary-embedding arguments of a layer that takes them (`ROPE_ARGUMENTS`)."""
    return {name: getattr(layer, name) for name in ROPE_ARGUMENTS}


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaLayerNorm(keras.layers.Layer):
    """Root-mean-square layer normalisation, as Llama uses it.

    Computes ``x / sqrt(mean(x**2) + epsilon) * scale`` in float32, casting back to the
    compute dtype before the scale is applied (as Hugging Face's ``LlamaRMSNorm`` does).

    Args:
        epsilon: float. Added to the mean square for numerical stability.

    Example:
        ```python
        norm = LlamaLayerNorm(epsilon=1e-6)
        y = norm(keras.ops.ones((2, 3, 8)))
        ```
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        check_positive_number("epsilon", epsilon)  # 0 or NaN: NaN outputs
        self.epsilon = epsilon

    def build(self, input_shape):
        dim = input_shape[-1]
        self.scale = self.add_weight(name="scale", shape=(dim,), initializer="ones", trainable=True)
        self.built = True

    def call(self, x):
        x32 = ops.cast(x, "float32")
        variance = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        x32 = x32 * ops.rsqrt(variance + self.epsilon)
        return ops.cast(x32, self.compute_dtype) * ops.cast(self.scale, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaRotaryEmbedding(keras.layers.Layer):
    """Rotary position embedding (RoPE) in the "rotate half" layout of Hugging Face Llama.

    Supports linear position scaling (``scaling_factor``: positions are divided by it) and
    Llama 3.1's frequency-dependent scaling (``frequency_adjustment_factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``pretraining_sequence_length``, all four or none).

    Args:
        max_wavelength: int. The base of the rotary frequencies ("rope_theta").
        scaling_factor: float. Linear position scaling; 1.0 means none.
        frequency_adjustment_factor: float or None. Llama 3.1 "factor".
        low_freq_factor: float or None.
        high_freq_factor: float or None.
        pretraining_sequence_length: int or None. Llama 3.1 "original_max_position_embeddings".

    Example:
        ```python
        rope = LlamaRotaryEmbedding(max_wavelength=10000)
        cos, sin = rope.cos_sin(keras.ops.arange(4)[None, :], head_dim=8)
        ```
    """

    def __init__(
        self,
        max_wavelength=10000,
        scaling_factor=1.0,
        frequency_adjustment_factor=None,
        low_freq_factor=None,
        high_freq_factor=None,
        pretraining_sequence_length=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        llama3 = {
            "frequency_adjustment_factor": frequency_adjustment_factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "pretraining_sequence_length": pretraining_sequence_length,
        }
        given = [k for k, v in llama3.items() if v is not None]
        if given and len(given) != len(llama3):
            missing = sorted(set(llama3) - set(given))
            raise ValueError(
                "Llama 3 RoPE scaling needs all of `frequency_adjustment_factor`, "
                "`low_freq_factor`, `high_freq_factor` and `pretraining_sequence_length`, or none. "
                f"Missing: {missing}. Received: {llama3}"
            )
        check_positive_number("max_wavelength", max_wavelength)
        check_positive_number("scaling_factor", scaling_factor)
        for name in given:
            check_positive_number(name, llama3[name])
        if given and not high_freq_factor > low_freq_factor:
            raise ValueError(
                "Llama 3 RoPE scaling needs `high_freq_factor` > `low_freq_factor` (the band "
                f"between them is interpolated). Received: low_freq_factor={low_freq_factor}, "
                f"high_freq_factor={high_freq_factor}"
            )
        self.max_wavelength = max_wavelength
        self.scaling_factor = scaling_factor
        self.frequency_adjustment_factor = frequency_adjustment_factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.pretraining_sequence_length = pretraining_sequence_length
        self.built = True

    def inverse_frequencies(self, head_dim):
        """The rotary inverse frequencies, shape ``[head_dim // 2]``, float32 (as a numpy array)."""
        import numpy as np

        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        inv_freq = 1.0 / (self.max_wavelength**exponents)
        if self.frequency_adjustment_factor is not None:
            factor = self.frequency_adjustment_factor
            old_len = self.pretraining_sequence_length
            low_wavelen = old_len / self.low_freq_factor
            high_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            inv_freq = np.where(medium, smoothed, scaled)
        return (inv_freq / self.scaling_factor).astype("float32")

    def cos_sin(self, positions, head_dim):
        """``cos`` and ``sin`` of shape ``[batch, seq, 1, head_dim]`` for integer positions [batch, seq]."""
        inv_freq = ops.convert_to_tensor(self.inverse_frequencies(head_dim))
        angles = ops.cast(positions, "float32")[..., None] * inv_freq  # [b, q, h/2]
        angles = ops.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, q, 1, h]
        return ops.cos(angles), ops.sin(angles)

    def apply(self, x, cos, sin):
        x32 = ops.cast(x, "float32")
        x1, x2 = ops.split(x32, 2, axis=-1)
        rotated = ops.concatenate([-x2, x1], axis=-1)
        return ops.cast(x32 * cos + rotated * sin, x.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_wavelength": self.max_wavelength,
                "scaling_factor": self.scaling_factor,
                "frequency_adjustment_factor": self.frequency_adjustment_factor,
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "pretraining_sequence_length": self.pretraining_sequence_length,
            }
        )
        return config
