"""Write tiny presets with KerasHub itself, plus KerasHub's own outputs on them.

Run once with the KerasHub reference environment (keras-hub is never a dependency of
keras-llama; its presets and outputs are committed as test data):

    KERAS_BACKEND=jax "$KERAS_HUB_PYTHON" scripts/make_test_presets.py

Writes under ``tests/data/keras_hub/``:

    llama/          LlamaCausalLM (SentencePiece tokenizer), one ``model.weights.h5``
    llama3/         Llama3CausalLM (byte-level BPE), Llama 3.1 RoPE scaling, sharded weights (``model.weights.json`` + ``model_0000N.weights.h5``)
    llama_int8/     the ``llama`` model after ``quantize("int8")``
    llama_adapter.lora.h5
                    LoRA adapters (rank 2, KerasHub's default targets, random factors) on
                    ``llama``, written by KerasHub's ``backbone.save_lora_weights``
    expected.npz    KerasHub's logits on fixed token ids for each preset (``{name}_logits``,
                    with ``token_ids`` / ``padding_mask``), and KerasHub's tokenizer output on
                    ``TEXTS`` (``{name}_tokens_{i}``), and its logits with the adapters loaded
                    (``llama_lora_logits``)

``--lora-only`` writes just the adapter file and its entry in ``expected.npz`` (the presets
are left as they are).

With ``--check-ours DIR`` it checks the other direction (keras-llama must be importable too,
e.g. run from the repository root): keras-llama loads each preset above (and builds a tied-
embedding model), saves it with ``save_to_preset`` into ``DIR/<name>``, and KerasHub's own
``keras_hub.models.CausalLM.from_preset(DIR/<name>)`` must give keras-llama's logits, token ids
and greedy generation; then LoRA adapters saved by keras-llama (``save_lora_weights``) must give
KerasHub's ``load_lora_weights`` our logits. One JSON line per check; exits non-zero on a
difference.

    KERAS_BACKEND=jax "$KERAS_HUB_PYTHON" scripts/make_test_presets.py --check-ours /tmp/ours
"""

import io
import json
import os
import shutil
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "keras_hub")
TEXTS = ["the quick brown fox", "a lazy dog jumps over the fox"]
TOKEN_IDS = np.array([[1, 5, 17, 42, 8, 3, 29, 11], [1, 9, 33, 2, 7, 14, 0, 0]], "int32")
PADDING_MASK = np.array([[1] * 8, [1] * 6 + [0] * 2], "int32")
TINY = dict(
    num_layers=2, num_query_heads=4, hidden_dim=32, intermediate_dim=64, num_key_value_heads=2
)


def spm_proto():
    """A tiny SentencePiece model (vocabulary 100) trained on a few sentences."""
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "a lazy dog sleeps in the sun while the fox runs",
        "brown bears and quick foxes live in the forest",
        "the sun rises over the hills and the dog wakes up",
    ] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=100,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        unk_id=3,
        bos_id=1,
        eos_id=2,
        byte_fallback=False,
        normalization_rule_name="identity",  # keeps the proto small (no NFKC table)
        minloglevel=2,
    )
    return model.getvalue()


def bpe_vocabulary():
    """A tiny byte-level BPE vocabulary and merges with Llama 3's special tokens."""
    letters = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "."]
    merges = ["t h", "th e", "Ġ the", "o x", "f ox", "Ġ fox", "o w", "r ow", "b row", "brow n"]
    vocab = {}
    for token in letters:
        vocab[token] = len(vocab)
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    for special in [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]:
        vocab[special] = len(vocab)
    return vocab, merges


def randomize(backbone, seed):
    """Weights large enough to give varied logits (KerasHub initialises with stddev 0.02)."""
    rng = np.random.default_rng(seed)
    for v in backbone.weights:
        shape = tuple(v.shape)
        if len(shape) == 1:
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            value = 0.2 * rng.standard_normal(shape)
        v.assign(value.astype("float32"))


def logits(causal_lm):
    return np.asarray(causal_lm({"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}))


def save(name, causal_lm, expected, **save_kwargs):
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    causal_lm.save_to_preset(path, **save_kwargs)
    expected[f"{name}_logits"] = logits(causal_lm)
    tokenizer = causal_lm.preprocessor.tokenizer
    for i, text in enumerate(TEXTS):
        expected[f"{name}_tokens_{i}"] = np.asarray(tokenizer(text)).astype("int32")
    # Reloading with KerasHub checks the preset is complete.
    reloaded = keras_hub.models.CausalLM.from_preset(path)
    np.testing.assert_allclose(logits(reloaded), expected[f"{name}_logits"], atol=1e-6)
    print(name, sorted(os.listdir(path)), file=sys.stderr)


def main():
    os.makedirs(OUT, exist_ok=True)
    expected = {"token_ids": TOKEN_IDS, "padding_mask": PADDING_MASK}

    # Llama 2 style: SentencePiece, untied, default RoPE.
    tokenizer = keras_hub.models.LlamaTokenizer(proto=spm_proto())
    preprocessor = keras_hub.models.LlamaCausalLMPreprocessor(tokenizer, sequence_length=16)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), layer_norm_epsilon=1e-5, **TINY
    )
    randomize(backbone, seed=0)
    llama = keras_hub.models.LlamaCausalLM(backbone, preprocessor)
    save("llama", llama, expected)

    # The same model quantized to int8 (KerasHub's *_int8 presets).
    llama.quantize("int8")
    save("llama_int8", llama, expected)

    # Llama 3.1 style: byte-level BPE, RoPE scaling, sharded weights. (Untied: KerasHub's
    # backbone config drops `tie_word_embeddings`, so it cannot reload a tied preset itself.)
    vocab, merges = bpe_vocabulary()
    tokenizer = keras_hub.models.Llama3Tokenizer(vocabulary=vocab, merges=merges)
    preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(tokenizer, sequence_length=16)
    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        rope_max_wavelength=500000,
        rope_frequency_adjustment_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_pretraining_sequence_length=8,
        **TINY,
    )
    randomize(backbone, seed=1)
    llama3 = keras_hub.models.Llama3CausalLM(backbone, preprocessor)
    # max_shard_size is in GB: ~20 kB shards give several files for this tiny model.
    save("llama3", llama3, expected, max_shard_size=2e-5)

    lora_adapters(expected)
    np.savez(os.path.join(OUT, "expected.npz"), **expected)
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(
            "Tiny presets written by KerasHub "
            f"{keras_hub.__version__} (Keras {keras.__version__}) with "
            "`scripts/make_test_presets.py`; `expected.npz` holds KerasHub's outputs on them.\n"
        )
    print(json.dumps({k: list(v.shape) for k, v in expected.items()}), file=sys.stderr)


def lora_adapters(expected):
    """KerasHub's own LoRA file on the ``llama`` preset, and its logits with the adapters."""
    causal_lm = keras_hub.models.CausalLM.from_preset(os.path.join(OUT, "llama"))
    causal_lm.backbone.enable_lora(2)
    rng = np.random.default_rng(3)
    for v in causal_lm.backbone.weights:
        if "lora_kernel" in v.path:  # B starts at zero: give both factors values
            v.assign((0.3 * rng.standard_normal(tuple(v.shape))).astype("float32"))
    path = os.path.join(OUT, "llama_adapter.lora.h5")
    causal_lm.backbone.save_lora_weights(path)
    expected["llama_lora_logits"] = logits(causal_lm)
    reloaded = keras_hub.models.CausalLM.from_preset(os.path.join(OUT, "llama"))
    reloaded.backbone.load_lora_weights(path)
    np.testing.assert_allclose(logits(reloaded), expected["llama_lora_logits"], atol=1e-6)


def check_ours(out_dir):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from keras_llama import models as ours

    cases = {name: ours.CausalLM.from_preset(os.path.join(OUT, name)) for name in
             ("llama", "llama3", "llama_int8")}  # fmt: skip
    # Tied embeddings: KerasHub cannot save these itself (its config drops the flag).
    backbone = ours.LlamaBackbone(
        vocabulary_size=100, layer_norm_epsilon=1e-5, tie_word_embeddings=True, **TINY
    )
    randomize(backbone, seed=2)
    preprocessor = ours.LlamaCausalLMPreprocessor.from_preset(os.path.join(OUT, "llama"))
    cases["llama_tied"] = ours.LlamaCausalLM(backbone, preprocessor)
    failures = []
    for name, our_lm in cases.items():
        path = os.path.join(out_dir, name)
        our_lm.save_to_preset(path)
        their_lm = keras_hub.models.CausalLM.from_preset(path)
        mask = PADDING_MASK.astype(bool)
        diff = float(np.abs(logits(their_lm) - logits(our_lm))[mask].max())
        tokens_equal = all(
            np.array_equal(their_lm.preprocessor.tokenizer(t), our_lm.preprocessor.tokenizer(t))
            for t in TEXTS
        )
        our_lm.compile(sampler="greedy")
        their_lm.compile(sampler="greedy")
        prompt = TEXTS[0]
        # KerasHub stops at its end token only; keep ours to that too.
        end = our_lm.preprocessor.tokenizer.end_token_id
        ours_text = our_lm.generate(prompt, max_length=12, stop_token_ids=[end])
        theirs_text = their_lm.generate(prompt, max_length=12)
        result = {
            "preset": name,
            "keras_hub_class": type(their_lm).__name__,
            "keras_hub_version": keras_hub.__version__,
            "max_abs_logit_diff": diff,
            "token_ids_equal": tokens_equal,
            "greedy_generation_equal": ours_text == theirs_text,
            "generated": theirs_text,
        }
        print(json.dumps(result))
        if diff > 1e-5 or not tokens_equal or ours_text != theirs_text:
            failures.append(name)
    # LoRA adapters saved by keras-llama load into KerasHub's model.
    our_lm = cases["llama"]
    our_lm.backbone.enable_lora(2)
    rng = np.random.default_rng(4)
    for v in our_lm.backbone.weights:
        if "lora_kernel" in v.path:
            v.assign((0.3 * rng.standard_normal(tuple(v.shape))).astype("float32"))
    path = os.path.join(out_dir, "ours.lora.h5")
    our_lm.backbone.save_lora_weights(path)
    their_lm = keras_hub.models.CausalLM.from_preset(os.path.join(OUT, "llama"))
    their_lm.backbone.load_lora_weights(path)
    mask = PADDING_MASK.astype(bool)
    diff = float(np.abs(logits(their_lm) - logits(our_lm))[mask].max())
    print(json.dumps({"lora_file": "ours.lora.h5", "max_abs_logit_diff": diff}))
    if diff > 1e-5:
        failures.append("lora")
    if failures:
        raise SystemExit(f"KerasHub disagrees with keras-llama on: {failures}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check-ours"]:
        check_ours(sys.argv[2])
    elif sys.argv[1:2] == ["--lora-only"]:
        path = os.path.join(OUT, "expected.npz")
        expected = dict(np.load(path))
        lora_adapters(expected)
        np.savez(path, **expected)
    else:
        main()
