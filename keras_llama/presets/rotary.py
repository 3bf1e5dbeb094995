"""The rotary q/k row layout shared by GGUF and Meta checkpoints.

Hugging Face (and this library) rotate the two *halves* of each head: dimension ``i`` pairs with
``i + head_dim / 2``. Meta's original checkpoints, and llama.cpp's GGUF files (its converter
applies ``permute`` in ``convert_hf_to_gguf.py``), rotate *adjacent pairs*: ``2j`` with
``2j + 1``. The same weights therefore appear with their query/key output rows reordered.
"""


def interleaved_to_half(weight, num_heads):
    """Reorder q/k projection rows from interleaved pairs to rotate-half layout.

    The inverse of llama.cpp's ``permute(weights, n_head)``; the same as transformers'
    ``reverse_permute_weights`` (GGUF loader) and the ``permute`` of its Meta converter.

    Args:
        weight: ``[num_heads * head_dim, ...]`` (the PyTorch ``[out, in]`` layout).
        num_heads: heads in this projection (query heads for q, key/value heads for k).

    Returns:
        An array of the same shape, row ``k * head_dim / 2 + j`` holding input row ``2j + k``.
    """
    head_dim = _head_dim(weight, num_heads)
    pairs = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return pairs.swapaxes(1, 2).reshape(weight.shape)


def half_to_interleaved(weight, num_heads):
    """Reorder q/k projection rows from rotate-half to interleaved-pair layout: the inverse of
    `interleaved_to_half`, and llama.cpp's ``permute(weights, n_head)`` (``convert_hf_to_gguf.py``)
    that GGUF writers apply.

    Returns:
        An array of the same shape, row ``2j + k`` holding input row ``k * head_dim / 2 + j``.
    """
    head_dim = _head_dim(weight, num_heads)
    halves = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def _head_dim(weight, num_heads):
    rows = weight.shape[0]
    if rows % num_heads or (rows // num_heads) % 2:
        raise ValueError(
            "A rotary projection must have num_heads * head_dim rows with an even head_dim. "
            f"Received: {rows} rows for num_heads={num_heads}"
        )
    return rows // num_heads
