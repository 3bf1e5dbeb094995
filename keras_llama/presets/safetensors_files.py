"""Reading safetensors checkpoints without loading whole files: each tensor is memory-mapped
from its file when asked for (a single ``model.safetensors`` or the shards named by
``model.safetensors.index.json``). Sizes and offsets in a header are checked against the file
before anything is read. Pickled PyTorch files are never opened.
"""

import json
import os
import struct

import numpy as np

from keras_llama.presets.handles import load_json, require_file, safe_join

# safetensors' numpy loader has no bfloat16; we read tensors through its header ourselves
# (memory-mapped, one tensor at a time) after `safe_open` has validated the file.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class SafetensorsFile:
    """Random access to the tensors of one ``.safetensors`` file, as float32/int numpy arrays."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(path, framework="numpy") as f:  # validates header and file size
                names = list(f.keys())
        except Exception as e:
            raise ValueError(
                f"Could not read the safetensors file {path!r} (truncated or corrupt?): {e}"
            ) from e
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        header.pop("__metadata__", None)
        self._offset = 8 + header_size
        self._header = header
        self.names = names

    def keys(self):
        return self.names

    def __getitem__(self, name):
        entry = self._header[name]  # KeyError for a missing tensor
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(
                f"Tensor {name!r} in {self.path!r} has dtype {entry['dtype']}, which is not "
                f"supported. Supported: {sorted(_SAFETENSORS_DTYPES)}"
            )
        bfloat16 = dtype == "bfloat16"
        if bfloat16:
            import ml_dtypes

            dtype = ml_dtypes.bfloat16
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == start:
            return np.zeros(shape, dtype)
        array = np.memmap(
            self.path, dtype=dtype, mode="r", offset=self._offset + start, shape=shape
        )
        return np.asarray(array, dtype="float32") if bfloat16 else array


class SafetensorsCheckpoint:
    """The tensors of ``model.safetensors`` or of the shards listed by its index file."""

    def __init__(self, folder):
        index_path = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index_path):
            index = load_json(folder, "model.safetensors.index.json")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(v, str) for v in weight_map.values()
            ):
                raise ValueError(
                    f"{index_path!r} has no `weight_map` object of tensor name -> shard file. "
                    f"Received: {str(weight_map if isinstance(index, dict) else index)[:80]}"
                )
            self._file_of = {name: safe_join(folder, file) for name, file in weight_map.items()}
            for file in sorted(set(weight_map.values())):
                require_file(folder, file, "weight shard (listed in model.safetensors.index.json)")
        elif os.path.isfile(single):
            self._file_of = None
            self._single = single
        else:
            found = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
            hint = (
                f" It has {found}: pickled PyTorch weights are not loaded (they can run code); "
                "convert them to safetensors with transformers first."
                if found
                else ""
            )
            raise FileNotFoundError(
                f"The Hugging Face checkpoint {folder!r} has neither `model.safetensors` nor "
                f"`model.safetensors.index.json`.{hint}"
            )
        self._files = {}

    def _file(self, path):
        if path not in self._files:
            self._files[path] = SafetensorsFile(path)
        return self._files[path]

    def __getitem__(self, name):
        if self._file_of is None:
            return self._file(self._single)[name]
        return self._file(self._file_of[name])[name]

    def names(self):
        """The names of every tensor (headers only; no tensor is read)."""
        if self._file_of is None:
            return set(self._file(self._single).keys())
        return set(self._file_of)
