"""LoRA adapter files in KerasHub's layout, so adapters move between the two libraries.

KerasHub's ``Backbone.save_lora_weights`` writes an HDF5 file (name ending in ``.lora.h5``)
through Keras's ``H5IOStore``::

    lora/vars/rank                      int64 scalar, the adapters' rank
    lora/{index}/vars/lora_kernel_a     [*kernel.shape[:-1], rank]
    lora/{index}/vars/lora_kernel_b     [rank, kernel.shape[-1]]

where ``index`` counts the backbone's nested layers that hold weights, in
``_flatten_layers(include_self=False)`` order (layer names are not unique, so KerasHub keys
adapters by position). keras-llama's backbones nest their layers as KerasHub's do, so the
indices agree (tested on a file KerasHub wrote). The scale is ``alpha / rank`` with
``alpha = rank`` in both libraries, so the file holds no alpha.
"""

import os

import numpy as np
from keras import ops

from keras_llama.utils import keras_compat
from keras_llama.utils.files import staged_file

SUFFIX = ".lora.h5"


def weighted_layers(backbone):
    """The layers KerasHub's adapter indices count: nested layers holding weights."""
    return [layer for layer in keras_compat.sublayers(backbone) if layer.weights]


def save(backbone, filepath, rank, layers):
    """Write ``layers``' adapters to ``filepath`` in KerasHub's layout.

    Written to a temporary file beside ``filepath`` and renamed, so a failed save leaves an
    existing file intact.
    """
    import h5py

    filepath = os.fspath(filepath)
    if not filepath.endswith(SUFFIX):
        raise ValueError(
            f"LoRA weights must be saved to a file ending in `{SUFFIX}`. "
            f"Received: filepath={filepath}"
        )
    index_of = {id(layer): i for i, layer in enumerate(weighted_layers(backbone))}
    with staged_file(filepath) as staging, h5py.File(staging, "w") as f:
        f.create_group("lora/vars")["rank"] = np.int64(rank)
        for layer in layers:
            entry = f.create_group(f"lora/{index_of[id(layer)]}/vars")
            entry["lora_kernel_a"] = ops.convert_to_numpy(layer.lora_kernel_a)
            entry["lora_kernel_b"] = ops.convert_to_numpy(layer.lora_kernel_b)


def read(filepath):
    """Read an adapter file.

    Returns:
        ``(rank, {layer index: (lora_kernel_a, lora_kernel_b)})``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a LoRA adapter file in KerasHub's layout.
    """
    import h5py

    filepath = os.fspath(filepath)
    if not os.path.isfile(filepath):
        raise FileNotFoundError(f"No LoRA weights file at {filepath!r}.")
    try:
        f = h5py.File(filepath, "r")
    except OSError as e:
        raise ValueError(f"Not a readable HDF5 file: {filepath!r} ({e}).") from e
    with f:
        rank_entry = f.get("lora/vars/rank")
        if not isinstance(rank_entry, h5py.Dataset) or rank_entry.shape != ():
            raise ValueError(
                f"Not a LoRA weights file: {filepath!r} has no scalar `lora/vars/rank` "
                "(the layout KerasHub's `save_lora_weights` writes)."
            )
        rank = rank_entry[()]
        rank = rank.item() if isinstance(rank, np.generic) else rank
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(
                f"The LoRA rank in {filepath!r} must be a positive integer. Received: {rank!r}"
            )
        adapters = {}
        for key, group in f["lora"].items():
            if key == "vars":
                continue
            kernels = group.get("vars") if isinstance(group, h5py.Group) else None
            if (
                not key.isdigit()
                or kernels is None
                or not {
                    "lora_kernel_a",
                    "lora_kernel_b",
                }
                <= set(kernels)
            ):
                raise ValueError(
                    f"Unexpected entry `lora/{key}` in {filepath!r}: expected "
                    "`lora/{layer index}/vars/lora_kernel_a` and `lora_kernel_b`."
                )
            adapters[int(key)] = (kernels["lora_kernel_a"][()], kernels["lora_kernel_b"][()])
    if not adapters:
        raise ValueError(f"The LoRA weights file {filepath!r} holds no adapters.")
    return int(rank), adapters


def resolve(backbone, filepath, adapters):
    """The backbone's layer for each adapter index, checked to take LoRA.

    Raises:
        ValueError: an index names no layer, or a layer that has no LoRA support.
    """
    layers = weighted_layers(backbone)
    resolved = {}
    for index in sorted(adapters):
        layer = layers[index] if index < len(layers) else None
        if layer is None or not hasattr(layer, "enable_lora"):
            what = "no layer" if layer is None else f"layer {layer.path!r}, which has no LoRA"
            raise ValueError(
                f"The LoRA weights file {filepath!r} holds an adapter for layer index {index}, "
                f"which is {what} in this model (it has {len(layers)} layers with weights): "
                "the file was saved from a different architecture."
            )
        resolved[index] = layer
    return resolved


def check_shapes(filepath, rank, layers, adapters):
    """Check every adapter's factors against its layer's kernel before anything is assigned.

    Raises:
        ValueError: naming the layer, the factor, its shape and the expected one.
    """
    for index, layer in layers.items():
        kernel_shape = tuple(layer.kernel.shape)
        expected = {
            "lora_kernel_a": kernel_shape[:-1] + (rank,),
            "lora_kernel_b": (rank, kernel_shape[-1]),
        }
        for name, value in zip(expected, adapters[index]):
            if tuple(value.shape) != expected[name]:
                raise ValueError(
                    f"The LoRA weights file {filepath!r} has {name} of shape "
                    f"{tuple(value.shape)} for layer {layer.path!r} (index {index}), which "
                    f"expects {expected[name]} at rank {rank}."
                )
