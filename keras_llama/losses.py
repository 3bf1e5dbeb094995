"""Losses for language models.

`SparseCategoricalCrossentropy` is Keras's loss of the same name (same arguments, same values,
same reductions) with a cheaper gradient on JAX. Keras computes the loss from logits as
``-sum(one_hot(labels) * log_softmax(logits))``: it builds a [tokens, vocabulary] one-hot
matrix and differentiates through ``log_softmax``, which on a 49k-token vocabulary costs
several [tokens, vocabulary] float32 buffers and, on XLA:CPU, a transposed copy of one of them
(0.4 s of a 7.9 s SmolLM2-135M training step at 4 x 256 tokens). Here the loss is
``logsumexp(logits) - logits[label]`` and its gradient ``softmax(logits) - one_hot(label)`` is
written directly in one pass (`jax.custom_vjp`, in `keras_llama.kernels.cross_entropy`: native
kernels on JAX CPU, plain JAX elsewhere), with the one-hot never materialized.

`CausalLM.compile` uses it for ``loss="auto"`` and in place of a Keras
``SparseCategoricalCrossentropy`` (or its name) passed as the loss.
"""

import keras
from keras import ops

from keras_llama.utils import keras_compat


def _fast_path(from_logits, ignore_class, axis):
    return (
        from_logits
        and ignore_class is None
        and axis in (-1, None)
        and keras.config.backend() == "jax"
    )


def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False, ignore_class=None, axis=-1):
    """`keras.losses.sparse_categorical_crossentropy`, computed from logits on JAX as
    ``logsumexp(logits) - logits[label]`` with a one-pass gradient (see the module docstring).
    Any other case is Keras's own function."""
    if not _fast_path(from_logits, ignore_class, axis):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=from_logits, ignore_class=ignore_class, axis=axis
        )
    y_true = ops.convert_to_tensor(y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)  # Keras accepts labels [..., 1] too
    labels_shape, leading = tuple(y_true.shape), tuple(y_pred.shape[:-1])
    if len(labels_shape) != len(leading) or any(
        a is not None and b is not None and a != b for a, b in zip(labels_shape, leading)
    ):
        raise ValueError(
            "Arguments target and output must have the same shape up until the last "
            f"dimension: target.shape={labels_shape}, output.shape={tuple(y_pred.shape)}"
        )
    return _logits_cross_entropy(y_pred, ops.cast(y_true, "int32"))


def _logits_cross_entropy(logits, labels):
    from keras_llama.kernels import cross_entropy
    from keras_llama.kernels.library import applies

    if applies("cross_entropy", logits):
        # JAX on CPU: the native kernels (same values; 16-wide exponentials, two passes over
        # the logits forward and one backward, the gradient written over the logits).
        return cross_entropy.cross_entropy(logits, labels)
    return cross_entropy.jax_cross_entropy(logits, labels)


@keras.saving.register_keras_serializable(package="keras_llama")
class SparseCategoricalCrossentropy(keras.losses.SparseCategoricalCrossentropy):
    """`keras.losses.SparseCategoricalCrossentropy` (same arguments and values) with the
    one-pass gradient of `sparse_categorical_crossentropy` on JAX when ``from_logits=True``.

    Example:
        ```python
        loss = SparseCategoricalCrossentropy(from_logits=True)
        float(loss(np.array([1]), np.array([[0.0, 0.0]])))  # 0.6931... = log(2)
        ```
    """

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction="sum_over_batch_size",
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(
            from_logits=from_logits,
            ignore_class=ignore_class,
            reduction=reduction,
            axis=axis,
            name=name,
            dtype=dtype,
        )
        self.fn = sparse_categorical_crossentropy

    @classmethod
    def from_keras(cls, loss):
        """The same loss as a Keras ``SparseCategoricalCrossentropy`` instance."""
        config = loss.get_config()
        config["axis"] = keras_compat.loss_function_kwargs(loss).get("axis", -1)
        return cls(**config)


def faster_equivalent(loss):
    """``loss`` itself, or this module's equivalent of it when it is Keras's sparse categorical
    cross-entropy (an instance of exactly that class, or its name)."""
    if isinstance(loss, str) and loss == "sparse_categorical_crossentropy":
        return SparseCategoricalCrossentropy()
    if type(loss) is keras.losses.SparseCategoricalCrossentropy:
        return SparseCategoricalCrossentropy.from_keras(loss)
    return loss
