"""Accuracy of each quantization scheme on the real SmolLM2-135M-Instruct (the built-in preset):
last-token logits of chat prompts against the float32 model (one JSON line per scheme).

    python benchmarks/quantized_accuracy.py
    python benchmarks/quantized_accuracy.py --modes int8 int8_w8a8

``cosine_min`` / ``cosine_mean``: cosine similarity of the last-token logits with float32's,
over the prompts; ``argmax_agree``: prompts whose top next token equals float32's. Modes are
`quantize()` modes; ``int8_w8a8`` is ``quantize("int8", quantize_activations=True)``,
``int8_blocks`` ``quantize("int8", block_size=32)`` (GGUF's Q8_0 blocks).
"""

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "Who wrote Romeo and Juliet?",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


def last_token_logits(causal_lm, prompts):
    import numpy as np
    from keras import ops

    rows = [causal_lm.preprocessor.tokenizer(p) for p in prompts]
    ids = np.zeros((len(rows), max(len(r) for r in rows)), "int32")
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    logits = ops.convert_to_numpy(causal_lm({"token_ids": ids, "padding_mask": mask}))
    return logits[np.arange(len(rows)), mask.sum(1) - 1].astype("float64")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--modes", nargs="+",
                        default=["int8", "int8_w8a8", "int8_blocks", "int4", "int4_weight_only"])  # fmt: skip
    args = parser.parse_args()
    import numpy as np

    from keras_llama.models import CausalLM

    def load():
        return CausalLM.from_preset(args.preset, dtype="float32")

    causal_lm = load()
    prompts = [
        causal_lm.preprocessor.apply_chat_template([{"role": "user", "content": q}])
        for q in QUESTIONS
    ]
    reference = last_token_logits(causal_lm, prompts)
    for mode in args.modes:
        causal_lm = load()
        if mode == "int8_w8a8":
            causal_lm.quantize("int8", quantize_activations=True)
        elif mode == "int8_blocks":
            causal_lm.quantize("int8", block_size=32)
        else:
            causal_lm.quantize(mode)
        ours = last_token_logits(causal_lm, prompts)
        cosine = (ours * reference).sum(-1)
        cosine /= np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1)
        agree = int((ours.argmax(-1) == reference.argmax(-1)).sum())
        print(json.dumps({"benchmark": "quantized_accuracy", "preset": args.preset,
                          "mode": mode, "prompts": len(prompts),
                          "cosine_min": round(float(cosine.min()), 5),
                          "cosine_mean": round(float(cosine.mean()), 5),
                          "argmax_agree": agree}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
