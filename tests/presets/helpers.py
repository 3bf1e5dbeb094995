"""Shared helpers for preset tests: tiny checkpoints written by each source's own library."""

import json
import os
import shutil

import numpy as np

DATA = os.path.join(os.path.dirname(__file__), "..", "data")
KERAS_HUB = os.path.join(DATA, "keras_hub")
SPM_PROTO = os.path.join(KERAS_HUB, "llama", "assets", "tokenizer", "vocabulary.spm")
BPE_VOCAB = os.path.join(KERAS_HUB, "llama3", "assets", "tokenizer", "vocabulary.json")
BPE_MERGES = os.path.join(KERAS_HUB, "llama3", "assets", "tokenizer", "merges.txt")


def token_batch(vocab=100, seed=0, batch=2, length=10):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, length)).astype("int32")


def logits(causal_lm, ids):
    from keras.ops import convert_to_numpy

    return convert_to_numpy(causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))


def write_spm_tokenizer(folder, add_bos=True, chat_template=None):
    """A Llama-2-style Hugging Face tokenizer: ``tokenizer.model`` + ``tokenizer_config.json``."""
    shutil.copy(SPM_PROTO, os.path.join(folder, "tokenizer.model"))
    config = {"add_bos_token": add_bos, "bos_token": "<s>", "eos_token": "</s>"}
    if chat_template:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def bpe_tokenizer_json(add_bos=True):
    """A byte-level BPE `tokenizers.Tokenizer` (Llama 3 style), built with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    with open(BPE_VOCAB) as f:
        vocab = json.load(f)
    merges = [tuple(line.split()) for line in open(BPE_MERGES) if line.strip()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [t for t in vocab if t.startswith("<|")]
    tok.add_special_tokens(specials)
    if add_bos:
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    return tok
