"""The one home of what keras-llama takes from Keras beyond its public API.

Each function names the private attribute or module it reads and why no public API does the
job. When Keras changes one of them, this file is the only place to change. Nothing here
replaces a function of Keras or Python: no process-wide patching.
"""

import contextlib
import gc


# --- quantized layers --------------------------------------------------------------------------
def int8_kernel(layer):
    """The int8 kernel of a quantized Dense/EinsumDense. ``layer.kernel`` dequantizes it; the
    packed decode weights keep it int8 (`keras_llama.kernels.packing`)."""
    return layer._kernel


def int8_embeddings(embedding):
    """The int8 table of a quantized (Reversible)Embedding (``embeddings`` dequantizes)."""
    return embedding._embeddings


def has_einsum_dequantization_scale(layer):
    """Whether this Keras can give `einsum_dequantization_scale` for ``layer``."""
    return hasattr(layer, "_adjust_scale_for_dequant")


def einsum_dequantization_scale(layer, scale):
    """An int8 EinsumDense's ``kernel_scale`` in the kernel's own layout (Keras keeps it in
    the output's layout and reshapes it when it dequantizes)."""
    return layer._adjust_scale_for_dequant(scale)


def policy_source_name(policy):
    """The float policy a quantized `DTypePolicy` was made from (its ``source_name``, which
    Keras exposes only as the constructor argument)."""
    return policy._source_name


# --- layers and variables ------------------------------------------------------------------------
def own_dtype_policy(layer):
    """The policy a layer was built with, a whole `DTypePolicyMap` included (the public
    ``dtype_policy`` resolves a map to the layer's entry)."""
    return layer._dtype_policy


def set_own_dtype_policy(layer, policy):
    """Replaces the policy a layer holds without the checks of the public setter (which
    refuses to change a built quantized layer's policy)."""
    layer._dtype_policy = policy


def sublayers(model):
    """Every layer inside ``model``, depth first, the model itself excluded (Keras's own
    traversal; ``model.layers`` lists only the top level)."""
    return model._flatten_layers(include_self=False)


def retrack_variables(layer):
    """Makes a layer list the variables its sublayers hold now (after weights are replaced
    behind Keras's back, e.g. a quantized layer restored from a preset)."""
    layer._track_variables()


def loss_function_kwargs(loss):
    """The keyword arguments a `keras.losses.LossFunctionWrapper` passes to its function
    (``axis`` of `SparseCategoricalCrossentropy`: not in its public config)."""
    return loss._fn_kwargs


# --- deferred variable initialization --------------------------------------------------------------
def deferred_variables():
    """Keras's global list of variables created without a value (``StatelessScope(
    initialize_variables=False)``), initialized when the outermost such scope closes."""
    from keras.src.backend.common import global_state

    return list(global_state.get_global_attribute("uninitialized_variables") or [])


def set_deferred_variables(variables):
    from keras.src.backend.common import global_state

    global_state.set_global_attribute("uninitialized_variables", list(variables))


def in_stateless_scope():
    from keras.src.backend.common.stateless_scope import in_stateless_scope as inside

    return inside()


def is_uninitialized(variable):
    """True for a variable created without a value that has none yet."""
    return getattr(variable, "_value", 0) is None and callable(
        getattr(variable, "_initializer", None)
    )


def initialize(variable, array=None):
    """Gives an uninitialized variable its first value: ``array``, or one drawn from its own
    initializer. Goes through the backend's own initialization, so the value gets the
    variable's device and layout (and, on torch, becomes its Parameter)."""
    if array is not None:
        variable._initializer = lambda shape, dtype=None: array
    variable._deferred_initialize()


# --- garbage collection ----------------------------------------------------------------------------
@contextlib.contextmanager
def one_garbage_collection():
    """Within this context, each of Keras's ``gc.collect()`` calls (one per deleted variable in
    ``Layer.__delattr__``: hundreds while quantizing a model) only scans objects made inside
    it; one full collection runs at the end. Uses `gc.freeze`, not a patched ``gc.collect``."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.collect()


# --- compiled JAX programs -------------------------------------------------------------------------
# The modules whose classes JAX's pickled executable wrapper names (avals, shardings, layouts).
_EXECUTABLE_MODULES = ("jax", "jaxlib", "numpy", "ml_dtypes")


def load_serialized_executable(payload, in_tree, out_tree):
    """``jax.experimental.serialize_executable.deserialize_and_load`` with its unpickler
    restricted to JAX's and numpy's classes (any other class name refuses the file).

    Private: ``serialize_executable._JaxPjrtUnpickler`` (the only unpickler that maps JAX's
    persistent ids back to the executable, device list and client; the public function offers
    no ``find_class`` hook) and the ``jax.stages.Compiled(executable, const_args, args_info,
    out_tree, no_kwargs=...)`` constructor, which the public function calls the same way."""
    import io
    import pickle

    import jax
    from jax.experimental import serialize_executable

    class Unpickler(serialize_executable._JaxPjrtUnpickler):
        def find_class(self, module, name):
            if module.split(".")[0] not in _EXECUTABLE_MODULES:
                raise pickle.UnpicklingError(f"refused class {module}.{name}")
            return super().find_class(module, name)

    backend = jax.devices()[0].client
    unloaded, args_info_flat, no_kwargs = Unpickler(io.BytesIO(payload), backend).load()
    args_info = in_tree.unflatten(args_info_flat)
    return jax.stages.Compiled(unloaded.load(), [], args_info, out_tree, no_kwargs=no_kwargs)
