"""A tiny random Llama 3 style causal LM with a byte-level BPE tokenizer (tests of generation
and serving build it on their own vocabularies)."""

import keras
import numpy as np

from keras_llama.models import Llama3CausalLMPreprocessor, LlamaBackbone, LlamaCausalLM
from keras_llama.tokenizers import BytePairTokenizer


def tiny_llama3_lm(vocab, merges, special, sequence_length, seed=0, hidden_dim=32):
    """``special``: begin, end and end-of-turn tokens first (then any others). Weights are
    larger than the default initialisation, so that greedy outputs vary. 4 query heads:
    ``hidden_dim`` 64 gives head size 16, where the native decode attention applies."""
    keras.utils.set_random_seed(seed)
    tokenizer = BytePairTokenizer(
        vocab,
        merges,
        special_tokens=special,
        start_token=special[0],
        end_token=special[1],
        stop_tokens=[special[2]],
    )
    preprocessor = Llama3CausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    backbone = LlamaBackbone(
        vocabulary_size=len(vocab),
        num_layers=2,
        num_query_heads=4,
        hidden_dim=hidden_dim,
        intermediate_dim=2 * hidden_dim,
        num_key_value_heads=2,
    )
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        if len(v.shape) > 1:
            v.assign(rng.normal(0, 0.3, v.shape).astype("float32"))
    causal_lm = LlamaCausalLM(backbone, preprocessor)
    causal_lm.compile(sampler="greedy")
    return causal_lm
