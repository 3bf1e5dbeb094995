"""Loading reads only what it needs (a tokenizer needs no weights), and a checkpoint tensor of
the wrong shape names itself, the shape expected and the one received. Checkpoints are written
with each source's own library; tokenizer ids are compared with that library's encoding."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from keras_llama.models import (
    Backbone,
    CausalLM,
    Llama3Tokenizer,
    LlamaTokenizer,
    Preprocessor,
    Tokenizer,
)
from tests.hf_reference import make_hf_model
from tests.presets.helpers import SPM_PROTO, bpe_tokenizer_json
from tests.presets.test_gguf import write_gguf
from tests.presets.test_meta import write_meta

TEXT = "The quick brown fox jumped over the lazy dog, twice!"


# --- a tokenizer reads no weights --------------------------------------------------------------
def test_hugging_face_folder_with_only_tokenizer_json_and_config(tmp_path):
    reference = bpe_tokenizer_json(add_bos=True)
    reference.save(str(tmp_path / "tokenizer.json"))
    vocab = reference.get_vocab()
    config = {
        "model_type": "llama", "vocab_size": len(vocab), "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "bos_token_id": vocab["<|begin_of_text|>"], "eos_token_id": vocab["<|end_of_text|>"],
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))

    tokenizer = Tokenizer.from_preset(str(tmp_path))
    assert type(tokenizer) is Llama3Tokenizer
    expected = reference.encode(TEXT).ids  # with the start token its post-processor adds
    assert tokenizer(TEXT).tolist() == expected[1:]
    preprocessor = Preprocessor.from_preset(str(tmp_path), sequence_length=128)
    ids = preprocessor.generate_preprocess(TEXT)["token_ids"]
    assert ids[: len(expected)].tolist() == expected
    with pytest.raises(FileNotFoundError, match="has neither `model.safetensors`"):
        Backbone.from_preset(str(tmp_path))


def test_meta_folder_whose_checkpoint_has_no_layers(tmp_path):
    import sentencepiece

    shutil.copy(SPM_PROTO, tmp_path / "tokenizer.model")
    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(params))
    torch.save({}, str(tmp_path / "consolidated.00.pth"))

    reference = sentencepiece.SentencePieceProcessor(model_file=SPM_PROTO)
    tokenizer = Tokenizer.from_preset(str(tmp_path))
    assert type(tokenizer) is LlamaTokenizer
    assert tokenizer(TEXT).tolist() == reference.encode(TEXT)
    preprocessor = Preprocessor.from_preset(str(tmp_path), sequence_length=128)
    ids = preprocessor.generate_preprocess(TEXT)["token_ids"]
    expected = [reference.bos_id()] + reference.encode(TEXT)
    assert ids[: len(expected)].tolist() == expected
    with pytest.raises(ValueError, match="is not a Llama checkpoint: it has no tensor"):
        Backbone.from_preset(str(tmp_path))


# --- wrong tensor shapes -----------------------------------------------------------------------
# "gqa": hidden 32, 4 query heads of 8, 2 key/value heads: k_proj is [16, 32] ([out, in]).
def _wrong_k_proj():
    return np.zeros((12, 32), np.float32)


def test_wrong_shape_in_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf_model("gqa", seed=41).save_pretrained(str(tmp_path), safe_serialization=True)
    path = str(tmp_path / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = _wrong_k_proj()
    save_file(tensors, path, metadata={"format": "pt"})
    match = (
        r"tensor 'model.layers.1.self_attn.k_proj.weight' \(our weight "
        r"`transformer_layer_1/self_attention/key/kernel`\).*expected \(16, 32\), "
        r"received \(12, 32\)"
    )
    with pytest.raises(ValueError, match=match):
        Backbone.from_preset(str(tmp_path))


def test_wrong_shape_in_gguf(tmp_path):
    path = str(tmp_path / "model.gguf")
    write_gguf(
        path, make_hf_model("gqa", seed=42), override={"blk.1.attn_k.weight": _wrong_k_proj()}
    )
    # GGUF lists dimensions innermost first: shapes as the file gives them.
    match = r"tensor 'blk.1.attn_k.weight'.*expected \(32, 16\), received \(32, 12\)"
    with pytest.raises(ValueError, match=match):
        CausalLM.from_preset(path)


def test_wrong_shape_in_meta_checkpoint(tmp_path):
    write_meta(str(tmp_path), make_hf_model("gqa", seed=43))
    path = os.path.join(tmp_path, "consolidated.00.pth")
    state = torch.load(path, weights_only=True)
    state["layers.1.attention.wk.weight"] = torch.from_numpy(_wrong_k_proj())
    torch.save(state, path)
    match = r"tensor 'layers.1.attention.wk.weight'.*expected \(16, 32\), received \(12, 32\)"
    with pytest.raises(ValueError, match=match):
        CausalLM.from_preset(str(tmp_path))
