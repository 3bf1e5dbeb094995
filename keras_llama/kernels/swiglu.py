"""``silu(gate) * up`` for training (`activations.cc`), differentiable.

One pass each way with 16-wide exponentials, where XLA makes three to five: ~0.1 s and 0.36 GB
of XLA temporaries in a SmolLM2-135M training step.

Needs ``library("swiglu").ensure_built()`` before `swiglu` is traced.
"""

import functools

import jax
import jax.numpy as jnp

from keras_llama.kernels.library import require_loaded

FFI_NAMES = {"forward": "keras_llama_swiglu_forward", "backward": "keras_llama_swiglu_backward"}


def swiglu(gate, up):
    """``silu(gate) * up`` (``silu(g) = g * sigmoid(g)``), differentiable (float32 arrays of
    one shape). Returns float32 of that shape."""
    return _default()(gate, up)


def forward(gate, up):
    """The forward kernel: ``silu(gate) * up``."""
    require_loaded("swiglu")
    out = jax.ShapeDtypeStruct(gate.shape, jnp.float32)
    return jax.ffi.ffi_call(FFI_NAMES["forward"], out, vmap_method="sequential")(gate, up)


def backward(gate, up, grad):
    """The backward kernel: the gradients of ``gate`` and ``up``."""
    require_loaded("swiglu")
    out = (jax.ShapeDtypeStruct(gate.shape, jnp.float32),) * 2
    return jax.ffi.ffi_call(FFI_NAMES["backward"], out, vmap_method="sequential")(gate, up, grad)


def make_swiglu(forward=forward, backward=backward):
    """`swiglu` with its custom VJP made of these ``forward`` and ``backward`` functions (same
    signatures as this module's): tests build a copy with a wrong half planted in."""

    @jax.custom_vjp
    def activation(gate, up):
        return forward(gate, up)

    def activation_forward(gate, up):
        return forward(gate, up), (gate, up)

    def activation_backward(residuals, grad):
        return backward(*residuals, grad)

    activation.defvjp(activation_forward, activation_backward)

    def op(gate, up):
        if gate.shape != up.shape:
            raise ValueError(
                "`gate` and `up` must have the same shape. Received: "
                f"gate.shape={gate.shape}, up.shape={up.shape}"
            )
        return activation(jnp.asarray(gate, jnp.float32), jnp.asarray(up, jnp.float32))

    return op


@functools.cache
def _default():
    return make_swiglu()
