"""Q8_0 and Q4_0 quantization in numpy, bit-equal to ``gguf.quants`` (ggml's reference
``quantize_row_q8_0_ref`` / ``quantize_row_q4_0_ref``), one chunk of blocks at a time.

Block layouts (32 weights per block, ``ggml-common.h``)::

    Q8_0  [d: f16][qs: 32 x int8]      d = max|w| / 127,  q = round-half-away(w / d)
    Q4_0  [d: f16][qs: 16 bytes]       d = w[argmax|w|] / -8,  q = min(15, trunc(w / d + 8.5))
                                       byte j: weight j in the low nibble, j + 16 in the high
"""

import numpy as np

BLOCK = 32
_CHUNK_BLOCKS = 1 << 15  # 1M weights per step: temporaries stay small


def _round_half_away(x):
    """ggml's ``roundf`` (gguf.quants.np_roundf): halves round away from zero."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _inverse(d):
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d)


def _q8_0(blocks):
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    qs = _round_half_away(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)


def _q4_0(blocks):
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    d = np.take_along_axis(blocks, imax, axis=-1) / -8
    q = np.trunc(blocks * _inverse(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    q = q.reshape(-1, 2, BLOCK // 2)
    packed = q[:, 0, :] | (q[:, 1, :] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)


QUANTIZERS = {"q8_0": (_q8_0, 2 + BLOCK), "q4_0": (_q4_0, 2 + BLOCK // 2)}


def quantize(array, kind):
    """``array`` ([..., n] with n a multiple of 32) -> uint8 ``[..., n / 32 * block bytes]``,
    the bytes ``gguf.quants.quantize(array, GGMLQuantizationType[kind.upper()])`` returns."""
    function, block_bytes = QUANTIZERS[kind]
    array = np.asarray(array, np.float32)
    if array.shape[-1] % BLOCK:
        raise ValueError(
            f"{kind} quantizes rows whose length is a multiple of {BLOCK}. "
            f"Received: shape {array.shape}"
        )
    blocks = array.reshape(-1, BLOCK)
    out = np.empty((blocks.shape[0], block_bytes), np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        out[start:stop] = function(blocks[start:stop])
    return out.reshape(*array.shape[:-1], array.shape[-1] // BLOCK * block_bytes)
