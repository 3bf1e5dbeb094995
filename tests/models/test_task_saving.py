"""`model.save()` / `keras.saving.load_model()` of a task with its preprocessor and tokenizer."""

import keras
import numpy as np
import sentencepiece as spm

from keras_llama.models import (
    LlamaBackbone,
    LlamaCausalLM,
    LlamaCausalLMPreprocessor,
    LlamaTokenizer,
)
from tests.data_files import wheel_file


def test_whole_model_save_keeps_tokenizer_and_weights(tmp_path):
    proto = wheel_file("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")
    tokenizer = LlamaTokenizer(proto=str(proto))
    preprocessor = LlamaCausalLMPreprocessor(tokenizer, sequence_length=16)
    backbone = LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=1,
        num_query_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_key_value_heads=1,
    )
    lm = LlamaCausalLM(backbone, preprocessor)
    path = tmp_path / "model.keras"
    lm.save(path)
    restored = keras.saving.load_model(path)

    text = "Grüße, world! 123"
    reference = spm.SentencePieceProcessor(model_file=str(proto)).encode(text)
    assert restored.preprocessor.tokenizer.tokenize(text).tolist() == reference
    assert restored.preprocessor.sequence_length == 16
    x, _, _ = preprocessor([text])
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored(x)), keras.ops.convert_to_numpy(lm(x))
    )
