"""A fast reader for the GGUF container: metadata as Python values, tensors as memory maps.

The `gguf` package's ``GGUFReader`` builds a numpy view for every part of every metadata field,
so that fields can be edited in place; for a 49k-token vocabulary plus 49k merges that is
~250k memory-map slices and several seconds. We only read, so this module walks the same
layout once with ``struct`` over an ``mmap`` (about 0.1 s for the same file) and keeps the
`gguf` package for what it is good at: the tensor-type tables and dequantization.

Layout (little-endian, GGUF versions 2 and 3; ``str`` is a uint64 length then UTF-8 bytes)::

    b"GGUF"  uint32 version  uint64 tensor_count  uint64 kv_count
    kv_count x   str key, uint32 value_type, value
                 (value_type 9 = array: uint32 element_type, uint64 count, elements)
    tensor_count x   str name, uint32 n_dims, uint64 dims[n_dims] (innermost first),
                     uint32 ggml_type, uint64 offset (from the start of the data section)
    padding to `general.alignment` (default 32), then the tensor data section

`GGUFFile.metadata` holds what ``ReaderField.contents()`` gives (arrays as lists; arrays of
arrays stay nested, where ``contents()`` flattens them);
`GGUFFile.tensors` holds `GGUFTensor`s whose ``data`` is shaped as ``GGUFReader``'s (quantized
types as ``uint8 [..., bytes per row]``), ready for ``gguf.quants.dequantize``.
"""

import mmap
import os
import struct
from typing import NamedTuple

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Bounds that let a crafted file fail before it costs memory or time: every count read from the
# file is checked against the bytes left (each item takes at least this many bytes), arrays nest
# at most `MAX_NESTING` deep (llama.cpp writes at most 2), tensors have at most 4 dimensions.
MAX_NESTING = 8
MAX_DIMS = 4  # GGML_MAX_DIMS
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset

# GGUF metadata value types -> struct format (scalars). 8 is a string, 9 an array.
_SCALARS = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_STRING, _ARRAY = 8, 9

# Unquantized tensor types -> numpy dtype (GGUFReader's choices); all others are byte blocks.
_PLAIN_TENSOR_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
}


class GGUFTensor(NamedTuple):
    """One tensor: ``shape`` in GGUF order (innermost dimension first), ``data`` a read-only
    memory-mapped array shaped as ``GGUFReader`` shapes it."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple
    n_elements: int
    n_bytes: int
    data_offset: int
    data: np.ndarray


class GGUFFile:
    """The metadata and tensors of a ``.gguf`` file.

    Attributes:
        path: the file.
        version: the GGUF version (2 or 3).
        metadata: ``{key: value}``; strings as ``str``, arrays as lists.
        tensors: ``{name: GGUFTensor}`` in file order.
        alignment, data_offset: the data section's alignment and start.

    Raises:
        ValueError: for a file that is not GGUF, of an unsupported version or byte order,
            truncated, or holding an unknown value or tensor type (the message says which).
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(f"{self.path!r} is too short to be a GGUF file ({size} bytes).")
            self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._size = size
        try:
            self._parse()
        except (struct.error, IndexError, OverflowError, MemoryError) as e:
            raise ValueError(
                f"{self.path!r} ends inside its GGUF header (truncated or corrupt): "
                f"{type(e).__name__}: {e}"
            ) from e

    # --- header ---------------------------------------------------------------------------
    def _parse(self):
        buf = self._buffer
        if buf[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path!r} is not a GGUF file (no GGUF magic).")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version & 0xFFFF == 0:
            raise ValueError(
                f"{self.path!r} is a big-endian GGUF file; only little-endian files are "
                f"supported. Received: version field {version:#x}"
            )
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{self.path!r} is GGUF version {version}; supported versions: "
                f"{SUPPORTED_VERSIONS}. Received: version={version}"
            )
        self.version = version
        tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
        offset = 24
        self._check_count("kv_count", kv_count, _MIN_KV_BYTES, offset)
        self.metadata = {}
        for _ in range(kv_count):
            key, offset = self._string(offset)
            (value_type,) = struct.unpack_from("<I", buf, offset)
            value, offset = self._value(value_type, offset + 4, key)
            self.metadata[key] = value
        infos = []
        self._check_count("tensor_count", tensor_count, _MIN_TENSOR_INFO_BYTES, offset)
        for _ in range(tensor_count):
            name, offset = self._string(offset)
            (n_dims,) = struct.unpack_from("<I", buf, offset)
            if n_dims > MAX_DIMS:
                raise ValueError(
                    f"Tensor {name!r} of {self.path!r} has more dimensions than GGUF allows "
                    f"({MAX_DIMS}). Received: n_dims={n_dims}"
                )
            dims = struct.unpack_from(f"<{n_dims}Q", buf, offset + 4)
            offset += 4 + 8 * n_dims
            ggml_type, data_offset = struct.unpack_from("<IQ", buf, offset)
            offset += 12
            infos.append((name, dims, ggml_type, data_offset))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(
                f"{self.path!r} has an invalid `general.alignment`: expected a power of two. "
                f"Received: {alignment!r}"
            )
        self.alignment = alignment
        self.data_offset = offset + (-offset % alignment)
        self.tensors = self._tensors(infos)

    def _string(self, offset):
        (length,) = struct.unpack_from("<Q", self._buffer, offset)
        end = offset + 8 + length
        if end > self._size:
            raise IndexError(f"a string of {length} bytes at offset {offset} passes the end")
        return _decode(self._buffer[offset + 8 : end], offset, self.path), end

    def _check_count(self, field, count, min_bytes, offset):
        """Refuse a count that cannot fit in the bytes left, before anything is allocated."""
        left = self._size - offset
        if count * min_bytes > left:
            raise ValueError(
                f"{self.path!r} is truncated or corrupt: {field} claims {count} entries of at least "
                f"{min_bytes} bytes each, but only {left} bytes follow offset {offset}. "
                f"Received: {field}={count}"
            )

    def _value(self, value_type, offset, key, depth=0):
        buf = self._buffer
        fmt = _SCALARS.get(value_type)
        if fmt is not None:
            (value,) = struct.unpack_from("<" + fmt, buf, offset)
            return value, offset + struct.calcsize(fmt)
        if value_type == _STRING:
            return self._string(offset)
        if value_type != _ARRAY:
            raise ValueError(
                f"Metadata field {key!r} of {self.path!r} has an unknown value type. "
                f"Received: {value_type}"
            )
        if depth >= MAX_NESTING:
            raise ValueError(
                f"Metadata field {key!r} of {self.path!r} nests arrays more than {MAX_NESTING} "
                f"deep (corrupt or crafted file). Received: nesting depth > {depth}"
            )
        element_type, count = struct.unpack_from("<IQ", buf, offset)
        offset += 12
        fmt = _SCALARS.get(element_type)
        if fmt is not None:  # numbers: one vectorised read
            dtype = np.dtype("<" + fmt) if fmt != "?" else np.dtype(np.bool_)
            self._check_count(f"the array {key!r}", count, dtype.itemsize, offset)
            end = offset + dtype.itemsize * count
            values = np.frombuffer(buf, dtype=dtype, count=count, offset=offset)
            return values.tolist(), end
        # Each string takes at least its 8-byte length; each inner array its 12-byte header.
        self._check_count(f"the array {key!r}", count, 8 if element_type == _STRING else 12, offset)
        if element_type == _STRING:  # lengths are inline, so one pass over the strings
            values = [None] * count
            unpack, size = struct.Struct("<Q").unpack_from, self._size
            for i in range(count):
                (length,) = unpack(buf, offset)
                start, offset = offset + 8, offset + 8 + length
                if offset > size:
                    raise IndexError(f"the array {key!r} passes the end of the file")
                values[i] = _decode(buf[start:offset], start, self.path, key)
            return values, offset
        values = []
        for _ in range(count):  # arrays of arrays
            value, offset = self._value(element_type, offset, key, depth + 1)
            values.append(value)
        return values, offset

    # --- tensors --------------------------------------------------------------------------
    def _tensors(self, infos):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        data = np.memmap(self.path, dtype=np.uint8, mode="r")
        tensors = {}
        for name, dims, type_id, relative_offset in infos:
            if name in tensors:
                raise ValueError(f"{self.path!r} holds the tensor {name!r} twice.")
            try:
                ggml_type = GGMLQuantizationType(type_id)
            except ValueError:
                raise ValueError(
                    f"Tensor {name!r} of {self.path!r} has an unknown GGML type id. "
                    f"Received: {type_id}"
                ) from None
            n_elements = 1
            for d in dims:  # Python ints: a crafted shape cannot overflow
                n_elements *= int(d)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            if dims and int(dims[0]) % block_size:
                raise ValueError(
                    f"Tensor {name!r} of {self.path!r} has a row of {int(dims[0])} elements, not "
                    f"a multiple of its {ggml_type.name} block size {block_size}. "
                    f"Received: shape={tuple(int(d) for d in dims)}"
                )
            n_bytes = n_elements * type_size // block_size
            start = self.data_offset + relative_offset
            if start + n_bytes > self._size:
                raise ValueError(
                    f"Tensor {name!r} of {self.path!r} needs bytes {start}..{start + n_bytes} "
                    f"but the file has {self._size} (truncated?)."
                )
            np_shape = tuple(int(d) for d in reversed(dims))
            plain = _PLAIN_TENSOR_DTYPES.get(ggml_type.name)
            if plain is not None:
                array = data[start : start + n_bytes].view(plain).reshape(np_shape)
            else:
                array = data[start : start + n_bytes].reshape(
                    quant_shape_to_byte_shape(np_shape, ggml_type)
                )
            tensors[name] = GGUFTensor(
                name, ggml_type, tuple(int(d) for d in dims), n_elements, n_bytes, start, array
            )
        return tensors


def _decode(raw, offset, path, key=None):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"in the metadata field {key!r}" if key else f"at offset {offset}"
        raise ValueError(
            f"{path!r} holds a string that is not UTF-8 {where}. Received: {raw[:40]!r}"
        ) from e
