"""fit()/evaluate()/predict() on raw strings and other input forms; a tiny model memorises a few
sentences (full fine-tuning and LoRA) and greedy generate() gives them back."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_llama.models import Llama3CausalLMPreprocessor, LlamaBackbone, LlamaCausalLM
from keras_llama.tokenizers import BytePairTokenizer
from keras_llama.tokenizers.byte_level_bpe import bytes_to_unicode

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>"]
VOCAB = SPECIAL + [bytes_to_unicode()[b] for b in range(256)]
SENTENCES = ["the cat sat on the mat.", "a dog ran far.", "birds sing at dawn!"]
SEQUENCE_LENGTH = 24  # >= the longest sentence + start + end: rows have different padding


def make_lm(seed=0):
    keras.utils.set_random_seed(seed)
    tokenizer = BytePairTokenizer(VOCAB, [], special_tokens=SPECIAL, start_token=SPECIAL[0],
                                  end_token=SPECIAL[1])  # fmt: skip
    preprocessor = Llama3CausalLMPreprocessor(tokenizer, sequence_length=SEQUENCE_LENGTH)
    backbone = LlamaBackbone(vocabulary_size=len(VOCAB), num_layers=2, num_query_heads=4,
                             hidden_dim=32, intermediate_dim=64, num_key_value_heads=2)  # fmt: skip
    return LlamaCausalLM(backbone, preprocessor)


@pytest.fixture(scope="module")
def trained():
    causal_lm = make_lm()
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    history = causal_lm.fit(SENTENCES, batch_size=3, epochs=200, verbose=0)
    return causal_lm, history


def test_fit_on_strings_memorises_and_generate_reproduces(trained):
    causal_lm, history = trained
    _, _, weights = causal_lm.preprocessor(SENTENCES)
    targets = int(np.sum(weights))  # real next-token targets; padding excluded
    # The token after the start token is a 1-in-3 guess at best (3 sentences), every other
    # token is determined: the loss floor is 3 ln 3 / targets and 2 targets stay wrong.
    floor = 3 * np.log(3) / targets
    losses = history.history["loss"]
    assert losses[0] > 4.0 and losses[-1] < floor + 0.01, (losses[0], losses[-1], floor)
    accuracy = history.history["sparse_categorical_accuracy"][-1]
    np.testing.assert_allclose(accuracy, (targets - 2) / targets, rtol=1e-6)
    for sentence in SENTENCES:
        prompt = sentence.split(" ")[0]
        assert causal_lm.generate(prompt, max_length=SEQUENCE_LENGTH) == sentence


def test_evaluate_and_predict_on_other_input_forms(trained):
    causal_lm, history = trained
    x, y, w = causal_lm.preprocessor(SENTENCES)
    loss_arrays = causal_lm.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)["loss"]
    # Strings: a list, a generator of batches, a PyDataset; all give the same loss.
    loss_strings = causal_lm.evaluate(SENTENCES, verbose=0, return_dict=True)["loss"]

    def generator():
        yield (SENTENCES[:2],)
        yield (SENTENCES[2:],)

    class Strings(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return SENTENCES[i : i + 1]

    # Batches of different sizes are averaged per batch by Keras: compare like with like.
    per_sentence = [causal_lm.evaluate([s], verbose=0, return_dict=True)["loss"] for s in SENTENCES]
    loss_pydataset = causal_lm.evaluate(Strings(), verbose=0, return_dict=True)["loss"]
    loss_generator = causal_lm.evaluate(generator(), verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(loss_strings, loss_arrays, rtol=1e-5)
    np.testing.assert_allclose(loss_pydataset, np.mean(per_sentence), rtol=1e-4)
    assert loss_generator < 0.1 and loss_arrays < 0.1
    logits = causal_lm.predict(SENTENCES, verbose=0)
    assert logits.shape == (3, SEQUENCE_LENGTH, len(VOCAB))
    np.testing.assert_allclose(logits, ops.convert_to_numpy(causal_lm(x)), atol=1e-4)


def test_fit_takes_generators_pydatasets_validation_strings_and_callbacks(tmp_path):
    causal_lm = make_lm(seed=1)
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-3))

    def batches():
        for _ in range(2):
            yield SENTENCES[:2]

    checkpoint = str(tmp_path / "ckpt.weights.h5")
    history = causal_lm.fit(
        batches(), validation_data=SENTENCES[2:], epochs=1, verbose=0,
        callbacks=[keras.callbacks.ModelCheckpoint(checkpoint, save_weights_only=True)],
    )  # fmt: skip
    assert set(history.history) >= {"loss", "val_loss"}
    reloaded = make_lm(seed=2)
    reloaded.load_weights(checkpoint)
    x, _, _ = causal_lm.preprocessor(SENTENCES)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(reloaded(x)), ops.convert_to_numpy(causal_lm(x))
    )


def test_lora_fine_tuning_learns_a_new_sentence_with_frozen_weights_untouched(trained):
    # LoRA adapts a trained model: start from the memorising model's weights and teach it a
    # fourth sentence through rank-4 adapters only.
    causal_lm = make_lm(seed=3)
    causal_lm.set_weights(trained[0].get_weights())
    backbone = causal_lm.backbone
    frozen_before = {v.path: np.array(v) for v in backbone.weights}
    rank = 4
    targets = ["query", "value", "feedforward_gate_dense", "feedforward_output_dense"]
    backbone.enable_lora(rank, target_layer_names=targets)
    # Counted by hand: EinsumDense LoRA is A [kernel_shape[:-1] + (rank,)], B [rank, last];
    # Dense LoRA is A [in, rank], B [rank, out]. hidden m=32, heads u=4, kv v=2, head h=8, f=64.
    m, u, v, h, f, layers = 32, 4, 2, 8, 64, 2
    per_layer = (m * u * rank + rank * h) + (m * v * rank + rank * h)  # query, value: 544 + 288
    per_layer += (m * rank + rank * f) + (f * rank + rank * m)  # gate, output: 384 + 384
    trainable = sum(int(np.prod(w.shape)) for w in causal_lm.trainable_weights)
    assert trainable == layers * per_layer == 3200
    new_sentence = "owls hoot."
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    history = causal_lm.fit(SENTENCES + [new_sentence], batch_size=4, epochs=300, verbose=0)
    losses = history.history["loss"]
    # Rank-4 adapters on a frozen model settle near 0.155 (the guessing floor is 4 ln 4 / 67).
    assert losses[0] > 1.5 and losses[-1] < 0.2, (losses[0], losses[-1])
    for w in backbone.weights:
        if "lora_kernel" not in w.path:
            np.testing.assert_array_equal(np.array(w), frozen_before[w.path], err_msg=w.path)
    for sentence in SENTENCES + [new_sentence]:
        prompt = sentence.split(" ")[0]
        assert causal_lm.generate(prompt, max_length=SEQUENCE_LENGTH) == sentence


def test_bad_training_inputs():
    causal_lm = make_lm()
    with pytest.raises(ValueError, match="empty"):
        causal_lm.fit([], epochs=1, verbose=0)
    with pytest.raises(ValueError, match="empty"):
        causal_lm.evaluate(np.zeros((0, 4), "int32"), verbose=0)
    causal_lm.preprocessor = None
    with pytest.raises(ValueError, match="no preprocessor"):
        causal_lm.fit(SENTENCES, epochs=1, verbose=0)
