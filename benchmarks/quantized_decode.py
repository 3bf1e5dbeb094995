"""Decode speed of quantized models: greedy generate() at batch 1 for float32 and each
quantization scheme, on the same random weights, in one process (one JSON line per run).

    python benchmarks/quantized_decode.py
    python benchmarks/quantized_decode.py --modes float32 int8_weight_only --new-tokens 64

Defaults: the SmolLM2-135M shape (see ``benchmarks/train.py``), a 32-token prompt, 64 new tokens
(no stop tokens), JAX. ``decode_tok_s`` = new_tokens / (median warm generate() time - prefill
time, the prefill measured as a one-token generate()); ``generate_s`` the median warm
generate(); ``weight_mb`` the backbone's weight memory.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("KERAS_BACKEND", "jax")


def _median_time(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(mode, args, weights):
    import keras
    import numpy as np
    from train import SMOLLM2_135M

    from keras_llama.models import LlamaBackbone, LlamaCausalLM

    backbone = LlamaBackbone(**SMOLLM2_135M)
    backbone.set_weights(weights)
    causal_lm = LlamaCausalLM(backbone)
    if mode != "float32":
        causal_lm.quantize(mode)
    causal_lm.compile(sampler="greedy")
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, SMOLLM2_135M["vocabulary_size"], (1, args.prompt_length))

    def generate(new_tokens):
        width = args.prompt_length + new_tokens
        inputs = {
            "token_ids": np.pad(prompt, ((0, 0), (0, new_tokens))).astype("int32"),
            "padding_mask": (np.arange(width) < args.prompt_length)[None].astype("int32"),
        }
        return causal_lm.generate(inputs, stop_token_ids=None)

    generate(args.new_tokens)  # compile
    generate(1)
    generate_s = _median_time(lambda: generate(args.new_tokens), args.runs)
    prefill_s = _median_time(lambda: generate(1), args.runs)
    weight_mb = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in backbone.weights)
    keras.backend.clear_session()
    return {
        "mode": mode,
        "generate_s": round(generate_s, 3),
        "decode_tok_s": round((args.new_tokens - 1) / max(generate_s - prefill_s, 1e-9), 1),
        "weight_mb": round(weight_mb / 2**20),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["float32", "int8", "int4_weight_only"])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from train import SMOLLM2_135M

    from keras_llama.models import LlamaBackbone

    weights = LlamaBackbone(**SMOLLM2_135M).get_weights()
    results = [run(mode, args, weights) for mode in args.modes]
    base = next((r for r in results if r["mode"] == "float32"), None)
    ratios = {}
    if base:
        for r in results:
            if r is not base:
                ratios[f"decode_{r['mode']}_vs_float32"] = round(
                    r["decode_tok_s"] / base["decode_tok_s"], 2
                )
    print(json.dumps({
        "benchmark": "quantized_decode", "date": time.strftime("%Y-%m-%d"),
        "batch_size": 1, "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
        "load_average_1min": round(os.getloadavg()[0], 2), "results": results, "ratios": ratios,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
