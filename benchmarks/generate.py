"""Generation speed: prefill and decode tokens/s, cold and warm, for keras-llama and, side by
side, KerasHub's ``generate()`` and transformers' ``generate()`` on the same model shape.

Prints one JSON line per (implementation, batch size). Each implementation runs in its own
subprocess (peak memory is that process's max RSS): keras-llama with this interpreter, KerasHub
with ``--keras-hub-python`` or ``$KERAS_HUB_PYTHON`` (a venv with keras-hub; never a dependency
of keras-llama; without either, the KerasHub run is skipped with a JSON line saying so), and
transformers (torch, float32) with ``--transformers-python``.

    python benchmarks/generate.py                                  # keras-llama only
    python benchmarks/generate.py --compare keras_hub transformers # all three, same run
    python benchmarks/generate.py --preset ./my_preset --batch-sizes 1
    KERAS_BACKEND=torch python benchmarks/generate.py --compare keras_hub transformers \
        --batch-sizes 1 --keras-hub-python PY   # the torch backend, all three side by side

Defaults: the SmolLM2-135M shape (30 layers, hidden 576, 9 query / 3 key-value heads,
intermediate 1536, vocab 49152, tied embeddings), float32, random weights, a 32-token prompt and
128 new tokens, greedy, no stop tokens (every run generates all 128 tokens).

Fields: ``cold_s`` first generate() including compilation; ``warm_s`` median of warm
generate() calls; ``generate_tok_s`` = batch * new_tokens / warm_s (end to end, comparable
across implementations); ``prefill_tok_s`` and ``decode_tok_s`` (keras-llama: its prefill and
decode stages timed separately; others: prefill = a forward pass over the prompt, decode = the
rest of generate()); ``best_*`` the fastest run instead of the median (less noise from other
processes on a shared machine); ``similar_prompt_s`` a warm generate() with a prompt 3 tokens shorter (a
recompile would show here); ``peak_rss_mb``.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SMOLLM2_135M = dict(
    vocabulary_size=49152,
    num_layers=30,
    num_query_heads=9,
    hidden_dim=576,
    intermediate_dim=1536,
    num_key_value_heads=3,
    rope_max_wavelength=100000,
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=True,
)


def _prompt(batch, length, vocab, shift=0):
    import numpy as np

    rng = np.random.default_rng(shift)
    return rng.integers(3, vocab, size=(batch, length)).astype("int32")


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def _report(args, impl, batch, cold, warm, prefill, extra=None):
    new = args.new_tokens
    warm_s = statistics.median(warm)
    prefill_s = statistics.median(prefill)
    decode_s = extra.pop("decode_s") if extra and "decode_s" in extra else warm_s - prefill_s
    best_decode_s = extra.pop("best_decode_s") if extra and "best_decode_s" in extra else None
    row = {
        "impl": impl,
        "batch": batch,
        "prompt_tokens": args.prompt_length,
        "new_tokens": new,
        "cold_s": round(cold, 3),
        "warm_s": round(warm_s, 4),
        "generate_tok_s": round(batch * new / warm_s, 2),
        "best_generate_tok_s": round(batch * new / min(warm), 2),
        "prefill_tok_s": round(batch * args.prompt_length / prefill_s, 1),
        "decode_tok_s": round(batch * new / decode_s, 2),
        "best_decode_tok_s": round(batch * new / (best_decode_s or min(warm) - min(prefill)), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "model": args.preset or "smollm2-135m-shape",
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d"),
    }
    row.update(extra or {})
    print(json.dumps(row), flush=True)


# --- keras-llama -----------------------------------------------------------------------------------
def run_ours(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, str(ROOT))
    import keras
    import numpy as np

    from keras_llama.models import LlamaBackbone, LlamaCausalLM

    if args.preset:
        # No dtype: the preset's own (GGUF blocks as stored); dtype=None would mean float32.
        kwargs = {"dtype": args.dtype} if args.dtype else {}
        causal_lm = LlamaCausalLM.from_preset(args.preset, **kwargs)
        causal_lm.preprocessor = None
    else:
        keras.utils.set_random_seed(0)
        causal_lm = LlamaCausalLM(LlamaBackbone(**SMOLLM2_135M, dtype=args.dtype))
    causal_lm.compile(sampler="greedy")
    vocab = causal_lm.backbone.vocabulary_size
    max_length = args.prompt_length + args.new_tokens

    def inputs(batch, length):
        ids = np.zeros((batch, max_length), "int32")
        ids[:, :length] = _prompt(batch, length, vocab, shift=length)
        mask = np.zeros((batch, max_length), bool)
        mask[:, :length] = True
        return {"token_ids": ids, "padding_mask": mask}

    def generate(batch, length=args.prompt_length):
        out = causal_lm.generate(inputs(batch, length), stop_token_ids=None)
        assert out["padding_mask"].sum() == batch * max_length
        return out

    from keras_llama.models.generation import preprocess

    for batch in args.batch_sizes:
        cold, _ = _timed(generate, batch)
        engine = causal_lm.make_generate_function()
        prompts = preprocess(causal_lm, inputs(batch, args.prompt_length), None)
        warm, prefill, decode = [], [], []
        for _ in range(args.runs):
            warm.append(_timed(generate, batch)[0])
            # The two stages separately (block on the result of each).
            t_prefill, (state, steps) = _timed(_ready_call, engine.prefill, prompts)
            t_decode, _ = _timed(_ready_call, engine.decode, state, steps, ())
            prefill.append(t_prefill)
            decode.append(t_decode)
        similar, _ = _timed(generate, batch, args.prompt_length - 3)
        extra = {
            "decode_s": statistics.median(decode),
            "best_decode_s": min(decode),
            "similar_prompt_s": round(similar, 4),
        }
        if engine.jax:
            extra["compiled_decode_shapes"] = engine._decode_jit._cache_size()
        elif engine.compiled_step:
            extra["compiled_decode_shapes"] = engine.compiled_step.num_compiled
        extra["backend"] = keras.config.backend()
        extra["decode_step"] = engine.plan.decode.step
        if extra["backend"] == "torch":
            import torch

            extra["torch_threads"] = torch.get_num_threads()
        _report(args, "keras_llama", batch, cold, warm, prefill, extra)


def _ready_call(fn, *args):
    return _ready(fn(*args))


def _ready(x):
    import keras

    if keras.config.backend() == "jax":
        import jax

        jax.block_until_ready(x)
    return x


# --- KerasHub ----------------------------------------------------------------------------------
def run_keras_hub(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import keras_hub
    import numpy as np

    if args.preset:
        raise SystemExit("--preset is only supported for keras_llama")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(**SMOLLM2_135M, dtype=args.dtype)
    causal_lm = keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    max_length = args.prompt_length + args.new_tokens

    def inputs(batch, length):
        ids = np.zeros((batch, max_length), "int32")
        ids[:, :length] = _prompt(batch, length, SMOLLM2_135M["vocabulary_size"], shift=length)
        mask = np.zeros((batch, max_length), bool)
        mask[:, :length] = True
        return {"token_ids": ids, "padding_mask": mask}

    def generate(batch, length=args.prompt_length):
        return causal_lm.generate(inputs(batch, length), stop_token_ids=None)

    for batch in args.batch_sizes:
        cold, _ = _timed(generate, batch)
        warm = [_timed(generate, batch)[0] for _ in range(args.runs)]
        # Prefill as KerasHub does it: one cached forward pass over the padded max_length.
        ids = inputs(batch, args.prompt_length)["token_ids"]
        if keras.config.backend() == "jax":
            import jax

            build = jax.jit(lambda t: causal_lm._build_cache(t)[1])
            jax.block_until_ready(build(ids))
            prefill = [
                _timed(lambda b=build, i=ids: jax.block_until_ready(b(i)))[0]
                for _ in range(args.runs)
            ]
        else:  # torch: eager, as its generate() runs it
            import torch

            with torch.no_grad():
                ids = keras.ops.convert_to_tensor(ids)
                prefill = [_timed(causal_lm._build_cache, ids)[0] for _ in range(args.runs)]
        similar, _ = _timed(generate, batch, args.prompt_length - 3)
        extra = {"similar_prompt_s": round(similar, 4), "backend": keras.config.backend()}
        _report(args, "keras_hub", batch, cold, warm, prefill, extra)


# --- transformers ------------------------------------------------------------------------------
def run_transformers(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.preset:
        raise SystemExit("--preset is only supported for keras_llama")
    c = SMOLLM2_135M
    config = LlamaConfig(
        vocab_size=c["vocabulary_size"],
        hidden_size=c["hidden_dim"],
        intermediate_size=c["intermediate_dim"],
        num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        rope_theta=float(c["rope_max_wavelength"]),
        rms_norm_eps=c["layer_norm_epsilon"],
        tie_word_embeddings=c["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()

    def generate(batch, length=args.prompt_length):
        ids = torch.as_tensor(_prompt(batch, length, c["vocabulary_size"], shift=length)).long()
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    for batch in args.batch_sizes:
        cold, _ = _timed(generate, batch)
        warm = [_timed(generate, batch)[0] for _ in range(args.runs)]
        ids = torch.as_tensor(_prompt(batch, args.prompt_length, c["vocabulary_size"])).long()
        with torch.inference_mode():
            prefill = [_timed(model, ids)[0] for _ in range(args.runs)]
        similar, _ = _timed(generate, batch, args.prompt_length - 3)
        extra = {"similar_prompt_s": round(similar, 4), "torch_threads": torch.get_num_threads()}
        _report(args, "transformers", batch, cold, warm, prefill, extra)


KERAS_HUB_SKIPPED = (
    "KerasHub anchor skipped: no KerasHub interpreter. Pass --keras-hub-python PATH or set "
    "KERAS_HUB_PYTHON to a Python with keras-hub installed."
)
RUNNERS = {"keras_llama": run_ours, "keras_hub": run_keras_hub, "transformers": run_transformers}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=sorted(RUNNERS), default="keras_llama")
    parser.add_argument("--compare", nargs="*", default=[], choices=["keras_hub", "transformers"])
    parser.add_argument("--preset", default=None, help="a keras-llama preset instead of the config")
    parser.add_argument(
        "--dtype",
        default=None,
        help="the weights' dtype (default: float32, and a --preset's own, e.g. GGUF blocks as stored)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for every torch run (transformers, the torch backend)",
    )
    parser.add_argument(
        "--keras-hub-python",
        default=os.environ.get("KERAS_HUB_PYTHON"),
        help="a Python with keras-hub (default: $KERAS_HUB_PYTHON)",
    )
    parser.add_argument("--transformers-python", default=sys.executable)
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    if args.compare:  # one subprocess per implementation, one after the other
        impls = ["keras_llama", *args.compare]
        python = {"keras_hub": args.keras_hub_python, "transformers": args.transformers_python}
        passthrough = [a for a in (argv or sys.argv[1:]) if a not in ("--compare", *args.compare)]
        for impl in impls:
            if impl == "keras_hub" and not args.keras_hub_python:
                print(json.dumps({"impl": "keras_hub", "skipped": KERAS_HUB_SKIPPED}), flush=True)
                continue
            command = [python.get(impl, sys.executable), __file__, "--impl", impl, *passthrough]
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
            subprocess.run(command, check=True, env=env)
        return
    RUNNERS[args.impl](args)


if __name__ == "__main__":
    main()
