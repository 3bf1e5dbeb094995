"""Export to a Hugging Face transformers folder (``AutoModelForCausalLM.from_pretrained``).

What each part writes (KerasHub's split: the task writes both halves)::

    backbone      config.json, generation_config.json, model.safetensors
                  (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer     SentencePiece: tokenizer.model             + tokenizer_config.json,
                  byte-level BPE: tokenizer.json              special_tokens_map.json
    preprocessor  the tokenizer's files, with add_bos_token from ``add_start_token``

The config and weights go through the same tables the Hugging Face loader reads with
(`keras_llama.presets.huggingface`: `export_config`, `export_weights`), so a folder exported
here loads back here, and in transformers, with the same weights. LoRA adapters are merged;
quantized models are refused (`keras_llama.export.weights`).
"""

import json
import os
import re
import tempfile

import numpy as np

from keras_llama.export.atomic import atomic_folder
from keras_llama.export.weights import backbone_config, float_dtype, weight_reader
from keras_llama.presets import huggingface

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3  # bytes, transformers' default "5GB"
MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors*")
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja",
)  # fmt: skip
_UNITS = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


# --- entry points (the classes' export_to_transformers methods) ---------------------------------
def export_causal_lm(causal_lm, path, overwrite=False, max_shard_size=DEFAULT_MAX_SHARD_SIZE):
    """Write a causal LM as a Hugging Face transformers folder (`CausalLM.export_to_transformers`).

    Writes ``config.json``, ``generation_config.json`` and safetensors weights (LoRA merged),
    and, when the task has a preprocessor, the tokenizer's files with the chat template and
    ``add_bos_token``, into a temporary folder renamed to ``path``.

    Args:
        causal_lm: a `CausalLM` with float weights (a quantized model is refused).
        path: the folder to write.
        overwrite: replace an existing, non-empty folder.
        max_shard_size: bytes (int) or a size such as ``"5GB"``; larger weights are sharded
            with a ``model.safetensors.index.json``.

    Raises:
        OutputExistsError: (a `ValueError` and `FileExistsError`) when ``path`` exists and
            ``overwrite`` is False, or is a file where a folder is expected.
        ValueError: for a quantized model or a bad ``max_shard_size``.

    Example:
        ```python
        from keras_llama.export import transformers
        transformers.export_causal_lm(causal_lm, "./hf_model")
        # AutoModelForCausalLM.from_pretrained("./hf_model") loads it
        ```
    """
    preprocessor = causal_lm.preprocessor
    tokenizer = getattr(preprocessor, "tokenizer", None)
    with atomic_folder(path, overwrite) as folder:
        write_model(causal_lm.backbone, folder, max_shard_size, tokenizer)
        if tokenizer is not None:
            write_tokenizer(tokenizer, folder, getattr(preprocessor, "add_start_token", True))


def export_backbone(backbone, path, overwrite=False, max_shard_size=DEFAULT_MAX_SHARD_SIZE):
    """Write a backbone's transformers model files (`Backbone.export_to_transformers`).

    Args:
        backbone: a `Backbone` with float weights.
        path: the folder to write; other files already in it are kept with ``overwrite``.
        overwrite: replace this export's files in an existing, non-empty folder.
        max_shard_size: bytes (int) or a size such as ``"5GB"``.

    Raises:
        OutputExistsError: (a `ValueError` and `FileExistsError`) when ``path`` exists and
            ``overwrite`` is False, or is a file where a folder is expected.
        ValueError: for a quantized backbone or a bad ``max_shard_size``.

    Example:
        ```python
        from keras_llama.export import transformers
        transformers.export_backbone(backbone, "./hf_model")
        ```
    """
    with atomic_folder(path, overwrite, replaces=MODEL_FILES) as folder:
        write_model(backbone, folder, max_shard_size)


def export_tokenizer(tokenizer, path, overwrite=False, add_bos_token=None):
    """Write a tokenizer's transformers files (`Tokenizer.export_to_transformers`).

    SentencePiece tokenizers write ``tokenizer.model``, byte-level BPE ones ``tokenizer.json``;
    both with ``tokenizer_config.json``, ``special_tokens_map.json`` and the chat template.

    Args:
        tokenizer: a `Tokenizer`.
        path: the folder to write; other files already in it are kept with ``overwrite``.
        overwrite: replace this export's files in an existing, non-empty folder.
        add_bos_token: whether ``AutoTokenizer`` prepends the start token. None takes the
            family's convention (True for SentencePiece Llama, True for Llama 3).

    Raises:
        OutputExistsError: (a `ValueError` and `FileExistsError`) when ``path`` exists and
            ``overwrite`` is False, or is a file where a folder is expected.

    Example:
        ```python
        from keras_llama.export import transformers
        transformers.export_tokenizer(tokenizer, "./hf_tokenizer")
        # AutoTokenizer.from_pretrained("./hf_tokenizer") loads it
        ```
    """
    with atomic_folder(path, overwrite, replaces=TOKENIZER_FILES) as folder:
        write_tokenizer(tokenizer, folder, True if add_bos_token is None else add_bos_token)


def export_preprocessor(preprocessor, path, overwrite=False):
    """Write a preprocessor's tokenizer files (`CausalLMPreprocessor.export_to_transformers`),
    with ``add_bos_token`` from its ``add_start_token``.

    Args:
        preprocessor: a `CausalLMPreprocessor`.
        path: the folder to write; other files already in it are kept with ``overwrite``.
        overwrite: replace this export's files in an existing, non-empty folder.

    Raises:
        OutputExistsError: (a `ValueError` and `FileExistsError`) when ``path`` exists and
            ``overwrite`` is False, or is a file where a folder is expected.

    Example:
        ```python
        from keras_llama.export import transformers
        transformers.export_preprocessor(preprocessor, "./hf_tokenizer")
        ```
    """
    with atomic_folder(path, overwrite, replaces=TOKENIZER_FILES) as folder:
        write_tokenizer(preprocessor.tokenizer, folder, preprocessor.add_start_token)


# --- the model ----------------------------------------------------------------------------------
def write_model(backbone, folder, max_shard_size=DEFAULT_MAX_SHARD_SIZE, tokenizer=None):
    """``config.json``, ``generation_config.json`` and safetensors weights into ``folder``."""
    config = backbone_config(backbone)
    get = weight_reader(backbone)  # refuses quantized models before anything is written
    dtype = float_dtype(backbone)
    hf_config = huggingface.export_config(config)
    hf_config["torch_dtype"] = dtype
    ids = _special_ids(tokenizer) if tokenizer is not None else {}
    hf_config.update({k: v for k, v in ids.items() if k != "stop_ids"})
    _write_json(os.path.join(folder, "config.json"), hf_config)
    generation = {k: v for k, v in ids.items() if k != "stop_ids"}
    if ids.get("stop_ids"):
        generation["eos_token_id"] = ids["stop_ids"]
    _write_json(os.path.join(folder, "generation_config.json"), generation)
    tensors = ((name, _as_dtype(array, dtype)) for name, array in
               huggingface.export_weights(get, config))  # fmt: skip
    write_safetensors(tensors, folder, _parse_size(max_shard_size))


def write_safetensors(named_arrays, folder, max_shard_size):
    """``model.safetensors``, or shards of at most ``max_shard_size`` bytes (a tensor larger
    than that gets a shard of its own) plus ``model.safetensors.index.json``."""
    from safetensors.numpy import save_file

    shards, current, size, total = [], {}, 0, 0
    for name, array in named_arrays:
        if current and size + array.nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
    shards.append(current)
    metadata = {"format": "pt"}  # transformers requires it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(os.path.join(folder, "model.safetensors.index.json"), index)


def _as_dtype(array, dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    return array.astype(dtype, copy=False)


def _parse_size(size):
    """Bytes from an int or a string such as ``"5GB"`` / ``"500MiB"``."""
    if isinstance(size, (int, np.integer)) and size > 0:
        return int(size)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(
            "`max_shard_size` must be a positive number of bytes or a size such as '5GB'. "
            f"Received: max_shard_size={size!r}"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


# --- the tokenizer ------------------------------------------------------------------------------
def write_tokenizer(tokenizer, folder, add_bos_token=True):
    """The tokenizer files transformers' ``AutoTokenizer`` reads, into ``folder``.

    SentencePiece tokenizers load as transformers 5's ``SentencePieceBackend`` (the
    ``sentencepiece`` package itself); byte-level BPE ones as ``PreTrainedTokenizerFast``
    over our ``tokenizer.json``."""
    specials = {
        "bos_token": tokenizer.start_token,
        "eos_token": tokenizer.end_token,
        "pad_token": tokenizer.pad_token,
    }
    config = {
        **specials,
        "add_bos_token": bool(add_bos_token),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
    }
    proto = getattr(tokenizer, "proto", None)
    if proto is not None:  # SentencePiece (Llama 2): the model file as it is
        with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
            f.write(proto)
        unk = tokenizer.id_to_token(_unk_id(proto))
        # transformers' LlamaTokenizer re-encodes the model as a `tokenizers` BPE, which
        # splits whitespace runs differently from sentencepiece; its SentencePieceBackend
        # runs sentencepiece itself (ids equal), with the start token from the pattern.
        config.update(tokenizer_class="SentencePieceBackend", unk_token=unk, legacy=True,
                      special_tokens_pattern="bos" if add_bos_token else None,
                      sp_model_kwargs={})  # fmt: skip
        specials["unk_token"] = unk
    else:  # byte-level BPE: the `tokenizers` pipeline, with BOS added per add_bos_token
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        tokenizer_json = _bpe_tokenizer_json(tokenizer, add_bos_token)
        _write_json(os.path.join(folder, "tokenizer.json"), tokenizer_json)
    template = getattr(tokenizer, "chat_template", None)
    if template:
        config["chat_template"] = template
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    _write_json(
        os.path.join(folder, "special_tokens_map.json"),
        {k: v for k, v in specials.items() if v is not None},
    )


def _bpe_tokenizer_json(tokenizer, add_bos_token):
    with tempfile.TemporaryDirectory() as assets:
        tokenizer.save_assets(assets)  # writes the full `tokenizers` pipeline as tokenizer.json
        with open(os.path.join(assets, "tokenizer.json"), encoding="utf-8") as f:
            data = json.load(f)
    bos = tokenizer.start_token
    if add_bos_token and bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }  # fmt: skip
    else:
        data["post_processor"] = None
    return data


def _unk_id(proto):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    return processor.unk_id()


def _special_ids(tokenizer):
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` and the stop ids."""
    ids = {
        "bos_token_id": tokenizer.start_token_id,
        "eos_token_id": tokenizer.end_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token is not None else None,
    }
    stop = [int(i) for i in tokenizer.stop_token_ids]
    ids = {k: (None if v is None else int(v)) for k, v in ids.items()}
    ids["stop_ids"] = stop if len(stop) > 1 else None
    return ids


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
