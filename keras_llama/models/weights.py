"""Assigning converted weights ({variable path: array}) to a model's variables."""

import numpy as np


def assign_weights(backbone, named_arrays, source="checkpoint"):
    """Assign ``(path, array)`` pairs to ``backbone``'s variables, matched by variable path.

    Every variable must be assigned exactly once and every array must fit its variable; errors
    name the path and both shapes.
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
        variable.assign(np.asarray(array).astype(variable.dtype, copy=False))
        assigned.add(path)
    missing = sorted(set(variables) - assigned)
    if missing:
        raise ValueError(
            f"The {source} is missing {len(missing)} weight(s) of the model, e.g. {missing[:5]}"
        )
