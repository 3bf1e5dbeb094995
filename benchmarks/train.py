"""Training speed: tokens/s and peak memory of fit() for keras-llama and, side by side in the same
run, KerasHub's fit() (same Keras backend) and a transformers training loop (torch AdamW).

Prints one JSON line per run with every implementation's numbers and the ratios. Each
implementation runs in its own subprocess (peak memory is that process's max RSS): keras-llama
with this interpreter, KerasHub with ``--keras-hub-python`` or ``$KERAS_HUB_PYTHON`` (a venv
with keras-hub; never a dependency of keras-llama; without either, the KerasHub run is skipped and
the JSON line says so under ``keras_hub``), transformers with ``--transformers-python``.

    python benchmarks/train.py                          # all three, SmolLM2-135M shape
    python benchmarks/train.py --impls keras_llama      # keras-llama only
    python benchmarks/train.py --num-layers 4 --steps 3 # a smaller, quicker run

Defaults: the SmolLM2-135M shape (30 layers, hidden 576, 9 query / 3 key-value heads,
intermediate 1536, vocab 49152, tied embeddings), float32, random weights, batch 4 x 256 tokens,
AdamW (lr 1e-4, weight decay 0.01) everywhere, every position scored (no padding).

Fields per implementation: ``compile_s`` the first (warm-up) steps including compilation;
``step_s`` median seconds per training step over ``--steps`` steps; ``tokens_per_s`` =
batch * sequence_length / step_s (median); ``best_tokens_per_s`` from the fastest step (less
noise from other processes on a shared machine); ``final_loss``; ``peak_rss_mb``.
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
LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01


def _batch(args):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(3, args.config["vocabulary_size"], (args.batch_size, args.seq_len + 1))
    return ids.astype("int32")


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _StepTimer:
    """A Keras callback recording the wall time of each training batch."""

    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.start = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                # Keras returns logs lazily: converting the loss waits for the step to finish.
                self.losses.append(float(logs["loss"]))
                self.times.append(time.perf_counter() - self.start)

        timer = Timer()
        timer.times, timer.losses = [], []
        return timer


def _keras_fit(causal_lm, args):
    """Warm-up fit (compiles), then a timed fit of ``args.steps`` steps on the same batch."""
    import keras
    import numpy as np

    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(LEARNING_RATE, weight_decay=WEIGHT_DECAY),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    ids = _batch(args)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]

    def fit(steps):
        # The same batch `steps` times, as arrays (KerasHub's fit() turns generators into
        # tf.data, which cannot read them).
        timer = _StepTimer()
        tile = [steps] + [1] * (y.ndim - 1)
        data_x = {k: np.tile(v, tile) for k, v in x.items()}
        causal_lm.fit(data_x, np.tile(y, tile), batch_size=args.batch_size, epochs=1,
                      shuffle=False, verbose=0, callbacks=[timer])  # fmt: skip
        return timer

    start = time.perf_counter()
    fit(args.warmup_steps)
    compile_s = time.perf_counter() - start
    timer = fit(args.steps)
    return compile_s, timer.times, timer.losses[-1]


def run_keras_llama(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, str(ROOT))
    import keras

    from keras_llama.models import LlamaBackbone, LlamaCausalLM

    keras.config.set_dtype_policy(args.dtype)
    backbone = LlamaBackbone(**args.config)
    return _keras_fit(LlamaCausalLM(backbone), args)


def run_keras_hub(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras
    import keras_hub

    keras.config.set_dtype_policy(args.dtype)
    backbone = keras_hub.models.LlamaBackbone(**args.config)
    return _keras_fit(keras_hub.models.LlamaCausalLM(backbone, preprocessor=None), args)


def run_transformers(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = args.config
    config = LlamaConfig(
        vocab_size=c["vocabulary_size"], hidden_size=c["hidden_dim"],
        intermediate_size=c["intermediate_dim"], num_hidden_layers=c["num_layers"],
        num_attention_heads=c["num_query_heads"], num_key_value_heads=c["num_key_value_heads"],
        rope_theta=c["rope_max_wavelength"], rms_norm_eps=c["layer_norm_epsilon"],
        tie_word_embeddings=c["tie_word_embeddings"], max_position_embeddings=8192,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(getattr(torch, args.dtype)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    ids = torch.as_tensor(_batch(args), dtype=torch.long)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    start = time.perf_counter()
    for _ in range(args.warmup_steps):
        step()
    compile_s = time.perf_counter() - start
    times, loss = [], None
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    return compile_s, times, loss


RUNNERS = {"keras_llama": run_keras_llama, "keras_hub": run_keras_hub,
           "transformers": run_transformers}  # fmt: skip


def worker(args):
    compile_s, times, loss = RUNNERS[args.worker](args)
    tokens = args.batch_size * args.seq_len
    step_s = statistics.median(times)
    result = {
        "impl": args.worker,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "best_tokens_per_s": round(tokens / min(times), 1),
        "final_loss": round(loss, 4),
        "peak_rss_mb": round(_peak_rss_mb()),
    }
    print("RESULT" + json.dumps(result), flush=True)


KERAS_HUB_SKIPPED = (
    "KerasHub anchor skipped: no KerasHub interpreter. Pass --keras-hub-python PATH or set "
    "KERAS_HUB_PYTHON to a Python with keras-hub installed."
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impls", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=None, help="override the config")
    parser.add_argument(
        "--keras-hub-python",
        default=os.environ.get("KERAS_HUB_PYTHON"),
        help="a Python with keras-hub (default: $KERAS_HUB_PYTHON)",
    )
    parser.add_argument("--transformers-python", default=sys.executable)
    parser.add_argument("--worker", choices=list(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.config = json.loads(args.config_json)
        return worker(args)

    config = dict(SMOLLM2_135M)
    if args.num_layers:
        config["num_layers"] = args.num_layers
    pythons = {"keras_llama": sys.executable, "keras_hub": args.keras_hub_python,
               "transformers": args.transformers_python}  # fmt: skip
    results = {}
    for impl in args.impls:
        if impl == "keras_hub" and not args.keras_hub_python:
            results[impl] = {"skipped": KERAS_HUB_SKIPPED}
            continue
        cmd = [pythons[impl], __file__, "--worker", impl, "--config-json", json.dumps(config)]
        for name in ("dtype", "batch_size", "seq_len", "steps", "warmup_steps"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
        if proc.returncode or not lines:
            results[impl] = {"error": (proc.stderr or proc.stdout)[-1500:]}
            continue
        results[impl] = json.loads(lines[-1][len("RESULT") :])
    ours = results.get("keras_llama", {})
    ratios = {}
    for other in ("keras_hub", "transformers"):
        theirs = results.get(other, {})
        if "tokens_per_s" in ours and "tokens_per_s" in theirs:
            ratios[f"tokens_per_s_vs_{other}"] = round(
                ours["tokens_per_s"] / theirs["tokens_per_s"], 2
            )
            ratios[f"best_tokens_per_s_vs_{other}"] = round(
                ours["best_tokens_per_s"] / theirs["best_tokens_per_s"], 2
            )
            ratios[f"peak_rss_vs_{other}"] = round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 2)
    line = {
        "benchmark": "train",
        "date": time.strftime("%Y-%m-%d"),
        "config": config,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "results": results,
        "ratios": ratios,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
