"""`keras-llama finetune` against plain fit(), and export times, on the real SmolLM2-135M-Instruct.

One process, one JSON line. Fine-tuning: the same generated chat JSONL (``--examples`` lines,
each padded to ``--max-length`` tokens), LoRA rank 8, batch 4, Adam; first through
`keras_llama.finetune.finetune` (what the command runs: read and check the file, mask the prompt
tokens, fit, merge, save a preset), then through a plain ``fit()`` on the same arrays with the
same LoRA setup. ``*_tokens_per_s`` = batch * max_length / median step time of the last epoch
(compilation excluded); ``finetune_total_s`` is the command's whole wall time. Export: wall
seconds of ``export_to_gguf`` (f16, q8_0, q4_0) and ``export_to_transformers`` of the float
model (issue 12's budget: q8_0 under 10 s).

    python benchmarks/finetune_export.py
    python benchmarks/finetune_export.py --examples 16 --epochs 2
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

PRESET = "smollm2_135m_instruct"


def _write_data(path, examples):
    """Chat examples long enough to fill most of the sequence."""
    with open(path, "w") as f:
        for i in range(examples):
            question = f"Tell me about the number {i} and what makes it special. " * 3
            answer = f"The number {i} is the successor of {i - 1} and comes before {i + 1}. " * 6
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def _step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append([])

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.epochs[-1].append(time.perf_counter() - self._start)

    return StepTimer()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    import keras

    from keras_llama.finetune import finetune, read_examples, to_arrays
    from keras_llama.models import CausalLM

    result = {"benchmark": "finetune_export", "preset": PRESET, **vars(args)}
    tokens_per_step = args.batch_size * args.max_length
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "train.jsonl")
        _write_data(data, args.examples)

        timer = _step_timer()
        start = time.perf_counter()
        finetune(PRESET, data, os.path.join(tmp, "out"), lora_rank=8, epochs=args.epochs,
                 batch_size=args.batch_size, max_length=args.max_length,
                 callbacks=[timer])  # fmt: skip
        result["finetune_total_s"] = round(time.perf_counter() - start, 1)
        step = statistics.median(timer.epochs[-1])
        result["finetune_tokens_per_s"] = round(tokens_per_step / step, 1)

        causal_lm = CausalLM.from_preset(PRESET, dtype="float32")  # as finetune loads it
        causal_lm.preprocessor.sequence_length = args.max_length
        x, y, weight = to_arrays(causal_lm.preprocessor, read_examples(data))
        causal_lm.backbone.enable_lora(8)
        causal_lm.compile(optimizer=keras.optimizers.Adam(2e-4))
        timer = _step_timer()
        causal_lm.fit(x, y, sample_weight=weight, batch_size=args.batch_size,
                      epochs=args.epochs, shuffle=True, callbacks=[timer], verbose=0)  # fmt: skip
        step = statistics.median(timer.epochs[-1])
        result["fit_tokens_per_s"] = round(tokens_per_step / step, 1)
        result["finetune_over_fit"] = round(
            result["finetune_tokens_per_s"] / result["fit_tokens_per_s"], 3
        )

        plain = CausalLM.from_preset(PRESET, dtype="float32")
        for dtype in ("f16", "q8_0", "q4_0"):
            start = time.perf_counter()
            plain.export_to_gguf(os.path.join(tmp, f"m-{dtype}.gguf"), dtype=dtype)
            result[f"export_gguf_{dtype}_s"] = round(time.perf_counter() - start, 2)
            result[f"export_gguf_{dtype}_mb"] = round(
                os.path.getsize(os.path.join(tmp, f"m-{dtype}.gguf")) / 2**20, 1
            )
        start = time.perf_counter()
        plain.export_to_transformers(os.path.join(tmp, "hf"))
        result["export_transformers_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
