"""llama.cpp's arithmetic for GGUF block weights, written out in numpy as a test reference: the
input of every product against Q8_0 / Q4_0 / Q4_1 blocks is first quantized to int8 in blocks
of 32 (ggml's ``quantize_row_q8_0`` / ``q8_1`` on x86), and `int8_block_inputs` applies that to
every linear layer of a transformers model."""

import contextlib

import numpy as np


def llama_cpp_quantized_input(x):
    """``(x_q [M, K] float64, d [M, G])``: ``x`` [M, K] float32 quantized as llama.cpp's
    ``quantize_row_q8_0`` does on x86, in float32 (``d = max|x| / 127``, ``q = x * (1 / d)``
    rounded half to even, as ``_mm256_round_ps`` does), the scale kept in float32;
    ``x_q = q * d``."""
    x = np.asarray(x, "float32")
    m, k = x.shape
    groups = -(-k // 32)
    padded = np.zeros((m, groups * 32), "float32")
    padded[:, :k] = x
    blocks = padded.reshape(m, groups, 32)
    d = (np.abs(blocks).max(-1) / np.float32(127)).astype("float32")
    inverse = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype("float32")
    v = (blocks * inverse[..., None]).astype("float32").astype("float64")
    q = np.rint(v)  # half to even
    x_q = (q * d.astype("float64")[..., None]).reshape(m, groups * 32)[:, :k]
    return x_q, d


@contextlib.contextmanager
def int8_block_inputs(model):
    """Within the block, every ``torch.nn.Linear`` of ``model`` multiplies its input quantized
    by `llama_cpp_quantized_input` along the last axis (what llama.cpp does before each dot
    product with GGUF blocks)."""
    import torch

    def quantize(module, args):
        x = args[0]
        flat = x.detach().reshape(-1, x.shape[-1]).float().numpy()
        x_q, _ = llama_cpp_quantized_input(flat)
        return (torch.from_numpy(x_q.astype("float32")).reshape(x.shape).to(x.dtype),)

    hooks = [
        m.register_forward_pre_hook(quantize)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
