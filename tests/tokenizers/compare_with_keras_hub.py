"""Compare our tokenizers and CausalLMPreprocessor with KerasHub's on the same vocabularies.

Not a test (KerasHub is not a test dependency): run it with a Python that has keras-hub,
from the repository root, e.g.

    KERAS_BACKEND=jax "$KERAS_HUB_PYTHON" -m tests.tokenizers.compare_with_keras_hub

It prints one JSON line per comparison and exits non-zero if a preprocessor output differs.

Known, deliberate differences (reported, not failures):
- KerasHub's Llama 3 tokenizer gives ids different from Meta's tiktoken encoding (and ours)
  on whitespace runs, digits, code and rare words (no `ignore_merges`); the preprocessor
  comparison for Llama 3 uses only texts on which both tokenizers agree.
- KerasHub's `generate_preprocess` always prepends the start token; ours follows
  `add_start_token` (a GGUF with `add_bos_token = false` must not get one).
- Special-token strings in text (`"a</s><s>b"`): plain text in both by default (checked).
  `LlamaTokenizer(..., parse_special_tokens=True)`, and any `ChatPrompt` (what
  `apply_chat_template` returns), make them token ids (llama.cpp, Meta, transformers'
  SentencePiece tokenizer); KerasHub has no such mode.
"""

import json
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_llama.models import (  # noqa: E402
    Llama3CausalLMPreprocessor,
    Llama3Tokenizer,
    LlamaCausalLMPreprocessor,
    LlamaTokenizer,
)
from tests.tokenizers.references import (  # noqa: E402
    TEXTS,
    llama3_tiktoken_path,
    mistral_v1_path,
)

BATCH = ["The quick brown fox.", "Hi", "", TEXTS[1], TEXTS[4]]
SETTINGS = [
    dict(sequence_length=8),
    dict(sequence_length=4),
    dict(sequence_length=12, add_start_token=False),
    dict(sequence_length=6, add_end_token=False),
    dict(sequence_length=5, add_start_token=False, add_end_token=False),
]


def numpy_tree(x):
    if isinstance(x, dict):
        return {k: numpy_tree(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)) and not isinstance(x[0], str):
        return tuple(numpy_tree(v) for v in x)
    return np.asarray(x)


def same(a, b):
    a, b = numpy_tree(a), numpy_tree(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and (a.astype("int64") == b.astype("int64")).all()


def compare_preprocessors(name, ours_cls, ours_tok, kh_cls, kh_tok, batch):
    failures = 0
    for settings in SETTINGS:
        ours, kh = ours_cls(ours_tok, **settings), kh_cls(kh_tok, **settings)
        for inputs in (batch, batch[0]):
            checks = {"call": same(ours(inputs), kh(inputs))}
            if settings.get("add_start_token", True):
                checks["generate_preprocess"] = same(
                    ours.generate_preprocess(inputs), kh.generate_preprocess(inputs)
                )
            else:  # deliberate difference: compare with KerasHub's packer told not to add it
                kh.generate_preprocess(inputs)  # builds `kh.packer`
                ids, mask = kh.packer(kh_tok(inputs), add_start_value=False, add_end_value=False)
                checks["generate_preprocess_no_start"] = same(
                    ours.generate_preprocess(inputs), {"token_ids": ids, "padding_mask": mask}
                )
            generated = ours.generate_preprocess(inputs)
            checks["generate_postprocess"] = ours.generate_postprocess(
                generated
            ) == kh.generate_postprocess(generated)
            failures += not all(checks.values())
            print(json.dumps({"model": name, "settings": settings,
                              "batched": isinstance(inputs, list), **checks}))  # fmt: skip
    return failures


def main():
    failures = 0
    # Llama (SentencePiece).
    ours_tok = LlamaTokenizer(mistral_v1_path())
    kh_tok = keras_hub.models.LlamaTokenizer(proto=mistral_v1_path())
    ids_equal = all(
        np.array_equal(ours_tok(t), np.asarray(kh_tok(t))) for t in TEXTS if t
    )  # fmt: skip
    print(json.dumps({"model": "llama", "tokenizer_ids_equal": ids_equal}))
    failures += not ids_equal
    special_texts = ["<s>Hello</s> <unk> [INST] hi [/INST]", "a </s><s> b"]
    parsing_tok = LlamaTokenizer(mistral_v1_path(), parse_special_tokens=True)
    plain_equal = all(np.array_equal(ours_tok(t), np.asarray(kh_tok(t))) for t in special_texts)
    parsed_differ = all(
        not np.array_equal(parsing_tok(t), np.asarray(kh_tok(t))) for t in special_texts
    )  # fmt: skip
    print(json.dumps({"model": "llama", "special_strings_plain_ids_equal": plain_equal,
                      "special_strings_parsed_when_opted_in": parsed_differ}))  # fmt: skip
    failures += not (plain_equal and parsed_differ)
    failures += compare_preprocessors(
        "llama", LlamaCausalLMPreprocessor, ours_tok,
        keras_hub.models.LlamaCausalLMPreprocessor, kh_tok, BATCH,
    )  # fmt: skip
    # Llama 3: KerasHub reads the vocabulary.json + merges.txt we save.
    ours_tok = Llama3Tokenizer.from_tiktoken(llama3_tiktoken_path())
    with tempfile.TemporaryDirectory() as tmp:
        ours_tok.save_assets(tmp)
        kh_tok = keras_hub.models.Llama3Tokenizer(
            vocabulary=os.path.join(tmp, "vocabulary.json"),
            merges=os.path.join(tmp, "merges.txt"),
        )
    differing = [t for t in TEXTS if t and not np.array_equal(ours_tok(t), kh_tok(t))]
    print(json.dumps({"model": "llama3", "texts": len(TEXTS), "ids_differ_on": differing}))
    agreed = [t for t in BATCH if np.array_equal(ours_tok(t), kh_tok(t))]
    failures += compare_preprocessors(
        "llama3", Llama3CausalLMPreprocessor, ours_tok,
        keras_hub.models.Llama3CausalLMPreprocessor, kh_tok, agreed,
    )  # fmt: skip
    print(json.dumps({"failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
