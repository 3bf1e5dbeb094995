"""Assigning converted weights ({variable path: array}) to a model's variables.

Loading a checkpoint into a freshly built model would normally draw every variable from its
random initializer first (for a 135M-parameter model on CPU, seconds of work: JAX compiles a
random-number kernel per variable shape) and then overwrite it. `build_uninitialized` builds the
model with Keras' deferred variable initialization instead (variables created under a
``keras.StatelessScope`` get a shape and an initializer but no value, as Keras does for
symbolic builds), and `assign_weights` / `load_keras_weights` give each variable its first
value straight from the checkpoint.
"""

import keras
import numpy as np

from keras_llama.utils import keras_compat


def build_uninitialized(constructor, **kwargs):
    """``constructor(**kwargs)`` without drawing initial values for its variables.

    Every variable of the result must then get a value, from `assign_weights` (which checks
    that) or `fill_uninitialized`. Where deferred initialization does not apply (inside a
    stateless scope, under a `keras.distribution` whose layouts are set at initialization, or a
    Keras without the mechanism) this is a plain ``constructor(**kwargs)``.
    """
    if keras_compat.in_stateless_scope() or keras.distribution.distribution() is not None:
        return constructor(**kwargs)
    before = keras_compat.deferred_variables()
    try:
        with keras.StatelessScope(initialize_variables=False):
            model = constructor(**kwargs)
    finally:
        # Keras keeps a global list of deferred variables and initializes them (randomly) when
        # the next outermost stateless scope closes: ours are taken off it, and initialized by
        # the loader instead.
        earlier = {id(v) for v in before}
        mine = [v for v in keras_compat.deferred_variables() if id(v) not in earlier]
        keras_compat.set_deferred_variables(before)
    weights = {id(w) for w in model.weights}
    for variable in mine:  # state outside `weights` (e.g. seed generators) starts as usual
        if id(variable) not in weights:
            keras_compat.initialize(variable)
    return model


def fill_uninitialized(model, value=0):
    """Give every still-uninitialized variable of ``model`` a constant value (zeros by default),
    e.g. before Keras' ``load_weights`` overwrites them all."""
    for variable in model.weights:
        if keras_compat.is_uninitialized(variable):
            try:
                dtype = np.dtype(variable.dtype)
            except TypeError:  # a dtype numpy lacks (float8...): use the variable's initializer
                keras_compat.initialize(variable)
                continue
            keras_compat.initialize(variable, np.full(variable.shape, value, dtype))


def assign_weights(backbone, named_arrays, source="checkpoint"):
    """Assign ``(path, array)`` pairs to ``backbone``'s variables, matched by variable path.

    Every variable must be assigned exactly once and every array must fit its variable; errors
    name the path and both shapes. Variables left uninitialized by `build_uninitialized` take
    the array as their first value.
    """
    variables = {v.path: v for v in backbone.weights}
    assigned = set()
    for path, array in named_arrays:
        variable = variables.get(path)
        if variable is None:
            raise ValueError(
                f"The {source} has a weight `{path}` that the model does not have. "
                f"Model weights start with: {sorted(variables)[:4]}"
            )
        if tuple(array.shape) != tuple(variable.shape):
            raise ValueError(
                f"Shape mismatch for weight `{path}` from the {source}: expected "
                f"{tuple(variable.shape)}, received {tuple(array.shape)}"
            )
        array = np.asarray(array).astype(variable.dtype, copy=False)
        if keras_compat.is_uninitialized(variable):
            keras_compat.initialize(variable, array)
        else:
            variable.assign(array)
        assigned.add(path)
    missing = sorted(set(variables) - assigned)
    if missing:
        raise ValueError(
            f"The {source} is missing {len(missing)} weight(s) of the model, e.g. {missing[:5]}"
        )
