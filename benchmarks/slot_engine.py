"""The serving slot engine alone, without HTTP: one request, then C requests at once.

Prints one JSON line: ``single_s`` (one request of ``--prompt-tokens`` + ``--output-tokens``,
``ignore_eos``, greedy), ``together_s`` (C such requests submitted at once), their tokens/s, and
``speedup`` = C x single_s / together_s (what `benchmarks/serve.py` calls the concurrency
speedup, here without the HTTP layer and its clients). Warm: every shape runs once untimed.

    python benchmarks/slot_engine.py                        # SmolLM2, 8 slots, max_model_len 272
    python benchmarks/slot_engine.py --max-model-len 1024   # a longer cache
"""

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _run(engine, request_class, count, args, rng):
    done = threading.Semaphore(0)
    tokens = [0] * count

    def deliver(i):
        def on_event(event):
            if event[0] == "token":
                tokens[i] += 1
            else:
                done.release()

        return on_event

    start = time.perf_counter()
    for i in range(count):
        prompt = [int(t) for t in rng.integers(3, 1000, args.prompt_tokens)]
        settings = {"ignore_eos": True}
        engine.submit(request_class(prompt, args.output_tokens, settings, (), deliver(i)))
    for _ in range(count):
        if not done.acquire(timeout=600):
            raise RuntimeError("a request did not finish within 600 s")
    return time.perf_counter() - start, sum(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: prompt + output + 16, as benchmarks/serve.py")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from keras_llama.models import CausalLM
    from keras_llama.serving.slots import Request, SlotEngine

    max_model_len = args.max_model_len or args.prompt_tokens + args.output_tokens + 16
    causal_lm = CausalLM.from_preset(args.preset)
    engine = SlotEngine(causal_lm, max_batch_size=args.clients, max_model_len=max_model_len)
    engine.start()
    rng = np.random.default_rng(0)
    try:
        _run(engine, Request, 1, args, rng)  # warm: both shapes compiled or loaded
        _run(engine, Request, args.clients, args, rng)
        single_s, single_tokens = _run(engine, Request, 1, args, rng)
        together_s, together_tokens = _run(engine, Request, args.clients, args, rng)
    finally:
        engine.stop()
    print(json.dumps({
        "benchmark": "slot_engine", "date": time.strftime("%Y-%m-%d %H:%M"),
        "preset": args.preset, "clients": args.clients, "max_model_len": max_model_len,
        "cache_length": engine.cache_length, "load_average_1min": round(os.getloadavg()[0], 2),
        "single_s": round(single_s, 2), "single_tok_s": round(single_tokens / single_s, 1),
        "together_s": round(together_s, 2),
        "together_tok_s": round(together_tokens / together_s, 1),
        "speedup": round(args.clients * single_s / together_s, 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
