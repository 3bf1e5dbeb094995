"""Llama building blocks: RMS norm, rotary embedding, grouped-query attention, decoder block.

Layer and attribute names follow KerasHub's so that KerasHub ``model.weights.h5`` files load as
they are (the weight paths are derived from them). Einsum letters used throughout:

    b batch   q query positions   s key positions (cache slots)   m hidden_dim
    u (or a) query heads   v key/value heads   g query heads per key/value head   h head_dim
    f intermediate_dim

The output projection is written ``bqah,ahm->bqm``: with the heads letter sorting before the
head-dim letter, XLA contracts the kernel in its stored order instead of copying it transposed
on every call (16-18% of a CPU decode step).
"""

import math

import keras
from keras import ops

from keras_llama.kernels import decode_matmul
from keras_llama.kernels.attention import attention as native_attention
from keras_llama.kernels.attention import supported as native_attention_supported
from keras_llama.kernels.library import applies as native_applies
from keras_llama.kernels.packing import dense_matrix, is_plain, pack_dense
from keras_llama.kernels.swiglu import swiglu as native_swiglu
from keras_llama.kernels.training_matmul import matmul as training_matmul
from keras_llama.kernels.training_matmul import matmul_transposed as training_matmul_transposed


def _kernel_initializer(stddev=0.02):
    return keras.initializers.RandomNormal(stddev=stddev)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def _heads_major(x, dtype, keys=False):
    """Values [b, q, v, h] -> [b * v, q, h], keys -> [b * v, h, q]: the layouts of the caches."""
    b, _, v, h = x.shape
    b = ops.shape(x)[0] if b is None else b
    x = ops.transpose(ops.cast(x, dtype), (0, 2, 3, 1) if keys else (0, 2, 1, 3))
    return ops.reshape(x, (b * v, h, -1) if keys else (b * v, -1, h))


def _project(x, kernel):
    """``x [..., K] @ kernel``: a [K, N] array, or `keras_llama.kernels.decode_matmul`'s
    `PackedWeights`."""
    if isinstance(kernel, decode_matmul.PackedWeights):
        return decode_matmul.matmul(x, kernel)
    return ops.matmul(x, kernel)


def _training_matmuls():
    """Whether training steps route their projections through `training_matmul`: JAX on CPU
    (what it fixes is how XLA:CPU compiles the backward products)."""
    if keras.config.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


@keras.saving.register_keras_serializable(package="keras_llama")
class ReversibleEmbedding(keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` (same arguments, variables, results and class name:
    Keras names a layer's entries in ``.weights.h5`` files after its class, so KerasHub's
    weight files keep loading) whose reverse projection, in a training step on JAX CPU with
    plain float weights, runs through `training_matmul_transposed` / `training_matmul`: the
    vocabulary projection's gradient without XLA's transposed copy of the [tokens, vocabulary]
    gradient (faster, 200 MB less at the SmolLM2-135M training shape)."""

    def call(self, inputs, reverse=False, training=None):
        if (
            reverse
            and training
            and _training_matmuls()
            and is_plain(self)
            and self.reverse_dtype is None
            and self.logit_soft_cap is None
        ):
            if self.tie_weights:
                table = ops.cast(self.embeddings, self.compute_dtype)
                return training_matmul_transposed(ops.cast(inputs, self.compute_dtype), table)
            kernel = ops.cast(self.reverse_embeddings, self.compute_dtype)
            return training_matmul(ops.cast(inputs, self.compute_dtype), kernel)
        return super().call(inputs, reverse=reverse)

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses to quantize subclasses (``type_check``); this one quantizes exactly as
        # its parent (the training path above only takes plain float weights).
        super().quantize(mode, type_check=False, config=config)

    # Keras hands quantized layers `call`'s arguments, ``training`` included.
    def _int8_call(self, inputs, reverse=False, training=None):
        return super()._int8_call(inputs, reverse=reverse)

    def _int4_call(self, inputs, reverse=False, training=None):
        return super()._int4_call(inputs, reverse=reverse)


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaLayerNorm(keras.layers.Layer):
    """Root-mean-square layer normalisation, as Llama uses it.

    Computes ``x / sqrt(mean(x**2) + epsilon) * scale`` in float32, casting back to the
    compute dtype before the scale is applied (as Hugging Face's ``LlamaRMSNorm`` does).

    Args:
        epsilon: float. Added to the mean square for numerical stability.

    Example:
    >>> norm = LlamaLayerNorm(epsilon=1e-6)
    >>> y = norm(keras.ops.ones((2, 3, 8)))
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
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
    >>> rope = LlamaRotaryEmbedding(max_wavelength=10000)
    >>> cos, sin = rope.cos_sin(keras.ops.arange(4)[None, :], head_dim=8)
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
        if scaling_factor is None or scaling_factor <= 0:
            raise ValueError(
                f"`scaling_factor` must be a positive number. Received: scaling_factor={scaling_factor}"
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

    def call(self, x, positions):
        """Rotates ``x`` of shape ``[batch, seq, heads, head_dim]`` by its ``positions`` [batch, seq]."""
        cos, sin = self.cos_sin(positions, x.shape[-1])
        return self.apply(x, cos, sin)

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


def causal_attention_mask(padding_mask, query_length, key_length=None, query_offset=0):
    """Boolean mask ``[batch, q, s]``: key ``s`` is visible to query ``q`` if it is not padding
    and ``s <= q + query_offset``."""
    key_length = query_length if key_length is None else key_length
    q_idx = ops.arange(query_length)[:, None] + query_offset
    k_idx = ops.arange(key_length)[None, :]
    causal = ops.less_equal(k_idx, q_idx)[None, :, :]
    if padding_mask is None:
        return causal
    return ops.logical_and(causal, ops.cast(padding_mask, "bool")[:, None, :])


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaAttention(keras.layers.Layer):
    """Grouped-query self-attention with rotary embeddings and an optional key/value cache.

    Args:
        num_query_heads: int. Number of query heads.
        num_key_value_heads: int. Number of key/value heads; divides ``num_query_heads``.
        rope_max_wavelength, rope_scaling_factor, rope_frequency_adjustment_factor,
        rope_low_freq_factor, rope_high_freq_factor, rope_pretraining_sequence_length:
            passed to `LlamaRotaryEmbedding`.
        kernel_initializer: initializer of the projection kernels.
        dropout: float. Dropout on the attention probabilities.

    Example:
    >>> attention = LlamaAttention(num_query_heads=4, num_key_value_heads=2)
    >>> y = attention(keras.ops.ones((1, 5, 32)))
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        rope_frequency_adjustment_factor=None,
        rope_low_freq_factor=None,
        rope_high_freq_factor=None,
        rope_pretraining_sequence_length=None,
        kernel_initializer="glorot_uniform",
        dropout=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("num_query_heads", num_query_heads)
        _check_positive_int("num_key_value_heads", num_key_value_heads)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`. Received: "
                f"num_query_heads={num_query_heads}, num_key_value_heads={num_key_value_heads}"
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_frequency_adjustment_factor = rope_frequency_adjustment_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_pretraining_sequence_length = rope_pretraining_sequence_length
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout = dropout
        self.num_key_value_groups = num_query_heads // num_key_value_heads
        self.rotary_embedding_layer = LlamaRotaryEmbedding(
            max_wavelength=rope_max_wavelength,
            scaling_factor=rope_scaling_factor,
            frequency_adjustment_factor=rope_frequency_adjustment_factor,
            low_freq_factor=rope_low_freq_factor,
            high_freq_factor=rope_high_freq_factor,
            pretraining_sequence_length=rope_pretraining_sequence_length,
            dtype=self.dtype_policy,
            name="rotary_embedding",
        )

    def build(self, inputs_shape):
        # inputs_shape: [b, q, m]
        hidden_dim = inputs_shape[-1]
        if hidden_dim % self.num_query_heads:
            raise ValueError(
                "`hidden_dim` must be divisible by `num_query_heads`. Received: "
                f"hidden_dim={hidden_dim}, num_query_heads={self.num_query_heads}"
            )
        self.head_dim = hidden_dim // self.num_query_heads
        u, v, h = self.num_query_heads, self.num_key_value_heads, self.head_dim
        common = dict(kernel_initializer=self._clone_initializer(), dtype=self.dtype_policy)
        self._query_dense = keras.layers.EinsumDense(
            "bqm,muh->bquh", output_shape=(None, u, h), name="query", **common
        )
        self._query_dense.build(inputs_shape)
        self._key_dense = keras.layers.EinsumDense(
            "bkm,mvh->bkvh", output_shape=(None, v, h), name="key", **common
        )
        self._key_dense.build(inputs_shape)
        self._value_dense = keras.layers.EinsumDense(
            "bkm,mvh->bkvh", output_shape=(None, v, h), name="value", **common
        )
        self._value_dense.build(inputs_shape)
        self._dropout_layer = keras.layers.Dropout(
            rate=self.dropout, dtype=self.dtype_policy, name="attention_dropout"
        )
        self._output_dense = keras.layers.EinsumDense(
            "bqah,ahm->bqm", output_shape=(None, hidden_dim), name="attention_output", **common
        )
        self._output_dense.build((None, None, u, h))
        self.built = True

    def call(
        self,
        hidden_states,
        attention_mask=None,
        positions=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        """Attends ``hidden_states`` [b, q, m] to itself, or to the cache when one is given.

        Args:
            attention_mask: bool [b, q, s], True where query q may see key s (s spans the
                cache when there is one). Defaults to a causal mask.
            positions: int [b, q], rotary positions of the queries. Defaults to
                ``cache_update_index + arange(q)``.
            cache: tuple ``(key_cache [b * v, h, s], value_cache [b * v, s, h])`` (heads-major,
                the batch folded in, keys transposed: see `_heads_major`), or None.
            cache_update_index: int (scalar) cache slot of the first query.

        Returns:
            ``output`` [b, q, m], or ``(output, (key_cache, value_cache))`` with a cache.
        """
        if training and cache is None and self._training_matmuls():
            b, q = ops.shape(hidden_states)[0], ops.shape(hidden_states)[1]
            u, v, h = self.num_query_heads, self.num_key_value_heads, self.head_dim
            query, key, value = (
                ops.reshape(training_matmul(hidden_states, dense_matrix(d, 1)), (b, q, n, h))
                for d, n in ((self._query_dense, u), (self._key_dense, v), (self._value_dense, v))
            )
        else:
            query = self._query_dense(hidden_states)
            key = self._key_dense(hidden_states)
            value = self._value_dense(hidden_states)
        return self._attend_projected(
            query, key, value, attention_mask, positions, cache, cache_update_index, training
        )

    def _training_matmuls(self):
        # Plain float projections (no LoRA, no quantization) on JAX CPU: `training_matmul`.
        denses = (self._query_dense, self._key_dense, self._value_dense, self._output_dense)
        return _training_matmuls() and is_plain(*denses)

    def call_with_fused_kernel(
        self,
        hidden_states,
        qkv_kernel,
        attention_mask,
        positions,
        cache,
        cache_update_index,
        output_kernel=None,
    ):
        """`call` with a cache (inference only), projecting queries, keys and values with ONE
        matmul by ``qkv_kernel`` [m, (u + 2v) * h] (the query, key and value kernels
        concatenated, see `fused_qkv_kernel`): one larger kernel instead of three. With
        `PackedWeights` (``qkv_kernel`` and ``output_kernel`` from
        `packed_kernels`), both projections run through the native decoding kernels. Same
        arguments and result as `call` otherwise."""
        b, q = ops.shape(hidden_states)[0], ops.shape(hidden_states)[1]
        u, v, h = self.num_query_heads, self.num_key_value_heads, self.head_dim
        projected = _project(hidden_states, qkv_kernel)  # [b, q, (u + 2v) * h]
        query = ops.reshape(projected[..., : u * h], (b, q, u, h))
        key = ops.reshape(projected[..., u * h : (u + v) * h], (b, q, v, h))
        value = ops.reshape(projected[..., (u + v) * h :], (b, q, v, h))
        return self._attend_projected(
            query,
            key,
            value,
            attention_mask,
            positions,
            cache,
            cache_update_index,
            False,
            output_kernel,
        )

    def fused_qkv_kernel(self):
        """The query, key and value kernels as one [m, (u + 2v) * h] array in the compute
        dtype (for `call_with_fused_kernel`)."""
        m = self._query_dense.kernel.shape[0]
        kernels = [self._query_dense.kernel, self._key_dense.kernel, self._value_dense.kernel]
        return ops.concatenate(
            [ops.reshape(ops.cast(k, self.compute_dtype), (m, -1)) for k in kernels], axis=1
        )

    def packed_kernels(self):
        """``(qkv, output)`` `PackedWeights` for the native decoding
        kernels: the query/key/value kernels concatenated [m, (u + 2v) * h] and the output
        kernel [u * h, m], float32 or int8 weight-only; None when a projection is neither."""
        qkv = pack_dense([self._query_dense, self._key_dense, self._value_dense], input_dims=1)
        output = pack_dense([self._output_dense], input_dims=2)
        if qkv is None or output is None:
            return None
        return qkv, output

    def _attend_projected(
        self,
        query,
        key,
        value,
        attention_mask,
        positions,
        cache,
        cache_update_index,
        training,
        output_kernel=None,
    ):
        # query [b, q, u, h], key and value [b, q, v, h], before the rotary embedding.
        q_len = ops.shape(query)[1]
        start = 0 if cache_update_index is None else cache_update_index
        if positions is None:
            positions = (ops.arange(q_len) + start)[None, :]
        cos, sin = self.rotary_embedding_layer.cos_sin(positions, self.head_dim)
        query = self.rotary_embedding_layer.apply(query, cos, sin)
        key = self.rotary_embedding_layer.apply(key, cos, sin)

        heads_major = cache is not None
        if cache is not None:
            # Caches are heads-major with the batch folded in, [b * v, s, h]: the layout the
            # decoding attention's batched matmuls read, with no size-1 axis for XLA to drop.
            # So XLA never copies a cache into another layout per decoding step, and never
            # duplicates the in-place update for a reshaped reader (at batch 1 that copied
            # every cache twice per step: 2.3 ms of 19).
            key_cache, value_cache = cache
            key = ops.slice_update(
                key_cache, (0, 0, start), _heads_major(key, key_cache.dtype, keys=True)
            )
            value = ops.slice_update(
                value_cache, (0, start, 0), _heads_major(value, value_cache.dtype)
            )
        if attention_mask is None:
            attention_mask = causal_attention_mask(
                None, q_len, ops.shape(key)[1], query_offset=start
            )
        output = self._attend(
            query, key, value, attention_mask, training, output_kernel, heads_major
        )
        if cache is not None:
            return output, (key, value)
        return output

    def _attend(
        self, query, key, value, attention_mask, training, output_kernel=None, heads_major=False
    ):
        # key and value: [b, s, v, h], or [b * v, s, h] when ``heads_major`` (caches).
        if heads_major and query.shape[1] == 1:
            return self._attend_one_query(
                query, key, value, attention_mask, training, output_kernel
            )
        if heads_major:  # -> [b, v, s, h]
            b = ops.shape(query)[0]
            key = ops.reshape(key, (b, self.num_key_value_heads, self.head_dim, -1))
            key = ops.transpose(key, (0, 1, 3, 2))
            value = ops.reshape(value, (b, self.num_key_value_heads, -1, self.head_dim))
        if self._use_dot_product_attention(query, training):
            if not heads_major and self._use_native_attention(query, key, value):
                attended = native_attention(
                    query, key, value, attention_mask, 1.0 / math.sqrt(self.head_dim)
                )
                return self._project_output(attended, output_kernel, training)
            if heads_major:
                key = ops.transpose(key, (0, 2, 1, 3))
                value = ops.transpose(value, (0, 2, 1, 3))
            return self._attend_dot_product(
                query, key, value, attention_mask, output_kernel, training
            )
        # query [b, q, u, h] -> [b, q, v, g, h]; keys and values are not repeated.
        kv = "bvsh" if heads_major else "bsvh"
        b, q = ops.shape(query)[0], ops.shape(query)[1]
        query = ops.reshape(
            query, (b, q, self.num_key_value_heads, self.num_key_value_groups, self.head_dim)
        )
        query = query * ops.cast(1.0 / math.sqrt(self.head_dim), query.dtype)
        key = ops.cast(key, query.dtype)
        value = ops.cast(value, query.dtype)
        scores = ops.einsum(f"bqvgh,{kv}->bvgqs", query, key)
        scores = ops.cast(scores, "float32")
        mask = ops.cast(attention_mask, "bool")[:, None, None, :, :]  # [b, 1, 1, q, s]
        scores = ops.where(mask, scores, ops.cast(-1e30, "float32"))
        probs = ops.softmax(scores, axis=-1)
        probs = self._dropout_layer(ops.cast(probs, query.dtype), training=training)
        attended = ops.einsum(f"bvgqs,{kv}->bqvgh", probs, value)
        attended = ops.reshape(attended, (b, q, self.num_query_heads, self.head_dim))
        return self._project_output(attended, output_kernel, training)

    def _attend_one_query(self, query, key, value, attention_mask, training, output_kernel):
        # Decoding: one query per row against the caches [b * v, s, h]. Both products are
        # plain batched matmuls over b * v in the operands' own layouts, and the result
        # [b * v, g, h] is already in query-head order: no cache copies, and no slow matmul
        # for an awkward output layout (at batch 8 that cost 12 ms a step).
        # query [b, 1, u, h]; mask [b, 1, s].
        b = ops.shape(query)[0]
        v, g, h = self.num_key_value_heads, self.num_key_value_groups, self.head_dim
        query = ops.reshape(query, (b * v, g, h)) * ops.cast(1.0 / math.sqrt(h), query.dtype)
        key = ops.cast(key, query.dtype)
        value = ops.cast(value, query.dtype)
        scores = ops.cast(ops.einsum("ngh,nhs->ngs", query, key), "float32")
        mask = ops.cast(attention_mask, "bool")[:, None]  # [b, 1, 1, s]
        mask = ops.broadcast_to(mask, (b, v, 1, ops.shape(mask)[-1]))
        mask = ops.reshape(mask, (b * v, 1, -1))
        scores = ops.where(mask, scores, ops.cast(-1e30, "float32"))
        probs = ops.softmax(scores, axis=-1)
        probs = self._dropout_layer(ops.cast(probs, query.dtype), training=training)
        attended = ops.einsum("ngs,nsh->ngh", probs, value)
        attended = ops.reshape(attended, (b, 1, self.num_query_heads, h))
        return self._project_output(attended, output_kernel)

    def _use_dot_product_attention(self, query, training):
        # Multi-token attention (training, scoring, prefill) on JAX. There the grouped einsums
        # above ("bqvgh,bsvh->bvgqs" and back) compile, inside a whole model's training step,
        # to dots XLA CPU runs about 2x slower than the head-batched dots of
        # `jax.nn.dot_product_attention` on repeated keys and values (SmolLM2-135M shape
        # fit() step 24 s -> 13 s here). Single-token decoding keeps the einsums (no repeat of
        # the cache per step); dropout on the probabilities needs them too.
        q_len = query.shape[1]
        return (
            keras.config.backend() == "jax"
            and (q_len is None or q_len > 1)
            and not (training and self.dropout > 0)
        )

    def _use_native_attention(self, query, key, value):
        # `keras_llama.kernels.attention` (JAX on CPU, float32, one device): the scores of a
        # block of query rows stay in a thread-local buffer, keys and values are read in place
        # (no repeat, no transposes). About 3x faster fwd+bwd than XLA's attention at the
        # SmolLM2-135M training shape, and no [b, u, q, s] tensors saved for the backward pass.
        return native_attention_supported(query, key, value) and native_applies(
            "attention", query, key, value
        )

    def _attend_dot_product(
        self, query, key, value, attention_mask, output_kernel=None, training=False
    ):
        # query [b, q, u, h]; key and value [b, s, v, h] -> [b, s, u, h]; mask [b, 1, q, s].
        # Same math as the einsum path: softmax in float32 over masked, scaled scores.
        key = ops.repeat(ops.cast(key, query.dtype), self.num_key_value_groups, axis=2)
        value = ops.repeat(ops.cast(value, query.dtype), self.num_key_value_groups, axis=2)
        attended = ops.dot_product_attention(
            query,
            key,
            value,
            mask=ops.cast(attention_mask, "bool")[:, None, :, :],
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self._project_output(attended, output_kernel, training)  # [b, q, u, h]

    def _project_output(self, attended, output_kernel=None, training=False):
        # attended [b, q, u, h] -> [b, q, m], by the layer or by a packed kernel [u * h, m].
        if output_kernel is None and training and self._training_matmuls():
            b, q = ops.shape(attended)[0], ops.shape(attended)[1]
            flat = ops.reshape(attended, (b, q, -1))
            return training_matmul(flat, dense_matrix(self._output_dense, 2))
        if output_kernel is None:
            return self._output_dense(attended)
        b, q = ops.shape(attended)[0], ops.shape(attended)[1]
        return _project(ops.reshape(attended, (b, q, -1)), output_kernel)

    def _clone_initializer(self):
        return self.kernel_initializer.__class__.from_config(self.kernel_initializer.get_config())

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "rope_frequency_adjustment_factor": self.rope_frequency_adjustment_factor,
                "rope_low_freq_factor": self.rope_low_freq_factor,
                "rope_high_freq_factor": self.rope_high_freq_factor,
                "rope_pretraining_sequence_length": self.rope_pretraining_sequence_length,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "dropout": self.dropout,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_llama")
class LlamaTransformerDecoder(keras.layers.Layer):
    """One Llama decoder block: pre-norm attention and a SwiGLU feed-forward, both residual.

    ::

        x ─┬─ norm ─ attention ─ dropout ─(+)─┬─ norm ─ silu(gate(x)) * up(x) ─ down ─(+)─>
           └──────────────────────────────────┘└──────────────────────────────────────────┘

    Args:
        intermediate_dim: int. Width of the feed-forward layer.
        num_query_heads: int.
        num_key_value_heads: int.
        rope_max_wavelength ... rope_pretraining_sequence_length: see `LlamaRotaryEmbedding`.
        activation: activation of the gate projection ("silu" for Llama).
        layer_norm_epsilon: float.
        kernel_initializer: initializer of the dense kernels.
        dropout: float.

    Example:
    >>> block = LlamaTransformerDecoder(intermediate_dim=64, num_query_heads=4, num_key_value_heads=2)
    >>> y = block(keras.ops.ones((1, 5, 32)))
    """

    def __init__(
        self,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        rope_frequency_adjustment_factor=None,
        rope_low_freq_factor=None,
        rope_high_freq_factor=None,
        rope_pretraining_sequence_length=None,
        activation="silu",
        layer_norm_epsilon=1e-6,
        kernel_initializer="glorot_uniform",
        dropout=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive_int("intermediate_dim", intermediate_dim)
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.rope_frequency_adjustment_factor = rope_frequency_adjustment_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_pretraining_sequence_length = rope_pretraining_sequence_length
        self.activation = keras.activations.get(activation)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.dropout = dropout
        self.supports_masking = True

    def build(self, decoder_sequence_shape):
        # decoder_sequence_shape: [b, q, m]
        hidden_dim = decoder_sequence_shape[-1]
        self._self_attention_layer = LlamaAttention(
            num_query_heads=self.num_query_heads,
            num_key_value_heads=self.num_key_value_heads,
            rope_max_wavelength=self.rope_max_wavelength,
            rope_scaling_factor=self.rope_scaling_factor,
            rope_frequency_adjustment_factor=self.rope_frequency_adjustment_factor,
            rope_low_freq_factor=self.rope_low_freq_factor,
            rope_high_freq_factor=self.rope_high_freq_factor,
            rope_pretraining_sequence_length=self.rope_pretraining_sequence_length,
            kernel_initializer=self._clone_initializer(),
            dropout=self.dropout,
            dtype=self.dtype_policy,
            name="self_attention",
        )
        self._self_attention_layer.build(decoder_sequence_shape)
        self._self_attention_layernorm = LlamaLayerNorm(
            epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy,
            name="self_attention_layernorm",
        )
        self._self_attention_layernorm.build(decoder_sequence_shape)
        self._self_attention_dropout = keras.layers.Dropout(
            rate=self.dropout, dtype=self.dtype_policy, name="self_attention_dropout"
        )
        dense = dict(use_bias=False, dtype=self.dtype_policy)
        self._feedforward_intermediate_dense = keras.layers.Dense(
            self.intermediate_dim,
            kernel_initializer=self._clone_initializer(),
            name="feedforward_intermediate_dense",
            **dense,
        )
        self._feedforward_intermediate_dense.build(decoder_sequence_shape)
        self._feedforward_gate_dense = keras.layers.Dense(
            self.intermediate_dim,
            activation=self.activation,
            kernel_initializer=self._clone_initializer(),
            name="feedforward_gate_dense",
            **dense,
        )
        self._feedforward_gate_dense.build(decoder_sequence_shape)
        self._feedforward_output_dense = keras.layers.Dense(
            hidden_dim,
            kernel_initializer=self._clone_initializer(),
            name="feedforward_output_dense",
            **dense,
        )
        self._feedforward_output_dense.build((None, None, self.intermediate_dim))
        self._feedforward_layernorm = LlamaLayerNorm(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="feedforward_layernorm"
        )
        self._feedforward_layernorm.build(decoder_sequence_shape)
        self.built = True

    def call(
        self,
        decoder_sequence,
        decoder_padding_mask=None,
        attention_mask=None,
        positions=None,
        cache=None,
        cache_update_index=None,
        training=None,
    ):
        """Runs the block on ``decoder_sequence`` [b, q, m].

        ``decoder_padding_mask`` [b, q] (1 for real tokens) builds a causal mask when no
        ``attention_mask`` [b, q, s] is given. With ``cache`` (see `LlamaAttention`), returns
        ``(output, new_cache)``.
        """
        if attention_mask is None and decoder_padding_mask is not None and cache is None:
            attention_mask = causal_attention_mask(
                decoder_padding_mask, ops.shape(decoder_sequence)[1]
            )
        residual = decoder_sequence
        x = self._self_attention_layernorm(decoder_sequence)
        attended = self._self_attention_layer(
            x,
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
        )
        if cache is not None:
            attended, cache = attended
        x = residual + self._self_attention_dropout(attended, training=training)

        residual = x
        x = self._feedforward_layernorm(x)
        if training and _training_matmuls() and self.fusable():
            # Training on XLA:CPU: `training_matmul` for its faster backward products.
            gate = training_matmul(x, dense_matrix(self._feedforward_gate_dense, 1))
            up = training_matmul(x, dense_matrix(self._feedforward_intermediate_dense, 1))
            x = self._gated_activation(gate, up)
            x = training_matmul(x, dense_matrix(self._feedforward_output_dense, 1))
        else:
            x = self._feedforward_gate_dense(x) * self._feedforward_intermediate_dense(x)
            x = self._feedforward_output_dense(x)
        x = residual + self._self_attention_dropout(x, training=training)
        if cache is not None:
            return x, cache
        return x

    def _gated_activation(self, gate, up):
        # ``activation(gate) * up``; SiLU in float32 on one device through the native SwiGLU
        # kernels (one pass each way instead of XLA's three to five: ~0.1 s and 0.36 GB of XLA
        # temporaries in a SmolLM2-135M training step).
        if self.activation is keras.activations.silu and native_applies("swiglu", gate, up):
            return native_swiglu(gate, up)
        return self.activation(gate) * up

    def fusable(self):
        """True when every projection is a plain float kernel (no quantization, no LoRA), so
        `call_with_fused_kernels` computes exactly what `call` does."""
        attention = self._self_attention_layer
        return is_plain(
            attention._query_dense,
            attention._key_dense,
            attention._value_dense,
            attention._output_dense,
            self._feedforward_gate_dense,
            self._feedforward_intermediate_dense,
            self._feedforward_output_dense,
        )

    def fused_kernels(self):
        """``(qkv_kernel [m, (u + 2v) * h], gate_up_kernel [m, 2f])`` in the compute dtype:
        the attention's query/key/value kernels and the feed-forward's gate and up kernels,
        each set concatenated along its outputs (for `call_with_fused_kernels`)."""
        gate_up = ops.concatenate(
            [
                ops.cast(self._feedforward_gate_dense.kernel, self.compute_dtype),
                ops.cast(self._feedforward_intermediate_dense.kernel, self.compute_dtype),
            ],
            axis=1,
        )
        return self._self_attention_layer.fused_qkv_kernel(), gate_up

    def packed_kernels(self):
        """This block's projections as `PackedWeights` for the native
        decoding kernels (for `call_with_fused_kernels`): a dict with ``qkv``, ``output``,
        ``gate_up`` and ``down``; None when some projection can be neither float32 nor int8
        weight-only packed (see `keras_llama.kernels.packing.pack_dense`)."""
        attention = self._self_attention_layer.packed_kernels()
        gate_up = pack_dense(
            [self._feedforward_gate_dense, self._feedforward_intermediate_dense], input_dims=1
        )
        down = pack_dense([self._feedforward_output_dense], input_dims=1)
        if attention is None or gate_up is None or down is None:
            return None
        return {"qkv": attention[0], "output": attention[1], "gate_up": gate_up, "down": down}

    def call_with_fused_kernels(
        self, decoder_sequence, kernels, attention_mask, positions, cache, cache_update_index
    ):
        """`call` with a cache for inference, with ``kernels`` from `fused_kernels` (two
        matmuls instead of five for the query/key/value and gate/up projections: fewer, larger
        kernels, faster decoding and compilation on CPU) or from `packed_kernels` (every
        projection through the native decoding kernels). Returns ``(output, new_cache)``."""
        if isinstance(kernels, dict):
            qkv, output, gate_up_kernel, down = (
                kernels["qkv"], kernels["output"], kernels["gate_up"], kernels["down"]
            )  # fmt: skip
        else:
            (qkv, gate_up_kernel), output, down = kernels, None, None
        residual = decoder_sequence
        x = self._self_attention_layernorm(decoder_sequence)
        attended, cache = self._self_attention_layer.call_with_fused_kernel(
            x, qkv, attention_mask, positions, cache, cache_update_index, output_kernel=output
        )
        x = residual + attended

        residual = x
        x = self._feedforward_layernorm(x)
        gate_up = _project(x, gate_up_kernel)  # [b, q, 2f]
        gate = self.activation(gate_up[..., : self.intermediate_dim])
        x = gate * gate_up[..., self.intermediate_dim :]
        x = self._feedforward_output_dense(x) if down is None else _project(x, down)
        return residual + x, cache

    def compute_output_shape(self, decoder_sequence_shape):
        return decoder_sequence_shape

    def _clone_initializer(self):
        return self.kernel_initializer.__class__.from_config(self.kernel_initializer.get_config())

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "rope_frequency_adjustment_factor": self.rope_frequency_adjustment_factor,
                "rope_low_freq_factor": self.rope_low_freq_factor,
                "rope_high_freq_factor": self.rope_high_freq_factor,
                "rope_pretraining_sequence_length": self.rope_pretraining_sequence_length,
                "activation": keras.activations.serialize(self.activation),
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "dropout": self.dropout,
            }
        )
        return config
