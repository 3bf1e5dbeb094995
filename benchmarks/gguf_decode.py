"""Decoding a GGUF file as it is stored: keras-llama against llama.cpp (llama-cpp-python, same
file, 2 threads), each in a fresh subprocess so that its peak RSS is its own (one JSON line).

    python benchmarks/gguf_decode.py                       # the built-in SmolLM2 Q4_1 file
    python benchmarks/gguf_decode.py --q8_0                # also a Q8_0 file of the same weights
    python benchmarks/gguf_decode.py --gguf path/to/model.gguf

keras-llama keeps Q8_0 / Q4_0 / Q4_1 weights as stored and decodes them with the native block
kernels. ``decode_tok_s`` (batch 1) = (new_tokens - 1) / (greedy generate() time - prefill
time, measured as a one-token generate()), medians of warm runs; ``b8_tok_s`` the same at batch
8 (8 sequences x tokens / s; keras-llama only: llama-cpp-python decodes one sequence).
llama.cpp: ``eval`` of the prompt, then one ``eval`` per greedy token, timed over the tokens
after the first; its repacked CPU buffers (``use_extra_bufts``) are off, as in the tests (they
crash on Q8_0 / Q4_0 tensors on the machine this was written on). ``peak_rss_mb``: the
subprocess's VmHWM after its runs (batch 1 and batch 8 run in separate subprocesses:
``peak_rss_mb`` is batch 1's, as llama.cpp's; ``b8_peak_rss_mb`` batch 8's).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    return None


def _median_time(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_ours(args):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from keras_llama.models import CausalLM

    causal_lm = CausalLM.from_preset(args.gguf)
    causal_lm.compile(sampler="greedy")
    rng = np.random.default_rng(0)
    vocab = causal_lm.backbone.vocabulary_size
    result = {"engine": "keras_llama", "plan": str(causal_lm.execution_plan().decode)}
    batch = args.batch  # one batch size per process: its peak RSS is its own
    prompt = rng.integers(3, vocab, (batch, args.prompt_length))

    def generate(new_tokens):
        width = args.prompt_length + new_tokens
        inputs = {
            "token_ids": np.pad(prompt, ((0, 0), (0, new_tokens))).astype("int32"),
            "padding_mask": np.broadcast_to(
                (np.arange(width) < args.prompt_length)[None], (batch, width)
            ).astype("int32"),
        }
        return causal_lm.generate(inputs, stop_token_ids=None)

    generate(args.new_tokens)  # compile
    generate(1)
    generate_s = _median_time(lambda: generate(args.new_tokens), args.runs)
    prefill_s = _median_time(lambda: generate(1), args.runs)
    tok_s = batch * (args.new_tokens - 1) / max(generate_s - prefill_s, 1e-9)
    result["decode_tok_s" if batch == 1 else f"b{batch}_tok_s"] = round(tok_s, 1)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def run_llama_cpp(args):
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params  # this subprocess only
    llm = Llama(model_path=args.gguf, n_ctx=args.prompt_length + args.new_tokens + 8,
                n_threads=2, n_threads_batch=2, verbose=False)  # fmt: skip
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, llm.n_vocab(), args.prompt_length).tolist()

    def decode():
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - start

    decode()  # warm
    seconds = statistics.median(decode() for _ in range(args.runs))
    return {"engine": "llama_cpp", "decode_tok_s": round((args.new_tokens - 1) / seconds, 1),
            "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


def write_q8_0(source, target):
    """The same weights re-quantized to Q8_0 with the gguf package (metadata copied)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = gguf.GGUFValueType(field.types[1]) if len(field.types) > 1 else None
        value = field.contents()
        if key == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_key_value(key, value, gguf.GGUFValueType(field.types[0]), sub)
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.asarray(tensor.data))
            continue
        q = gguf.quants.quantize(
            gguf.quants.dequantize(tensor.data, tensor.tensor_type),
            gguf.GGMLQuantizationType.Q8_0,
        )
        writer.add_tensor(tensor.name, q, raw_shape=q.shape,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def measure(args, path):
    results = {}
    for engine, batch in (("keras_llama", 1), ("keras_llama", 8), ("llama_cpp", 1)):
        command = [sys.executable, __file__, "--child", engine, "--gguf", path,
                   "--prompt-length", str(args.prompt_length), "--batch", str(batch),
                   "--new-tokens", str(args.new_tokens), "--runs", str(args.runs)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        if batch == 8:  # its own process: the batch-1 peak RSS is batch 1's alone
            results["keras_llama"]["b8_tok_s"] = result["b8_tok_s"]
            results["keras_llama"]["b8_peak_rss_mb"] = result["peak_rss_mb"]
        else:
            results[engine] = result
    ours, theirs = results["keras_llama"], results["llama_cpp"]
    return {
        "file": os.path.basename(path),
        "results": list(results.values()),
        "speed_vs_llama_cpp": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2),
        "rss_vs_llama_cpp": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 2),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help="defaults to the built-in SmolLM2 file")
    parser.add_argument("--q8_0", action="store_true", help="also a Q8_0 copy of the weights")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["keras_llama", "llama_cpp"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_ours if args.child == "keras_llama" else run_llama_cpp
        print(json.dumps(run(args)), flush=True)
        return
    if args.gguf is None:
        sys.path.insert(0, str(ROOT))
        from keras_llama.models.llama3.llama3_presets import backbone_presets
        from keras_llama.presets import handles

        args.gguf = handles.resolve(backbone_presets["smollm2_135m_instruct"]["kaggle_handle"])
    files = [measure(args, args.gguf)]
    if args.q8_0:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            target = os.path.join(folder, "q8_0.gguf")
            write_q8_0(args.gguf, target)
            files.append(measure(args, target))
    print(json.dumps({
        "benchmark": "gguf_decode", "date": time.strftime("%Y-%m-%d"),
        "prompt_length": args.prompt_length, "new_tokens": args.new_tokens,
        "load_average_1min": round(os.getloadavg()[0], 2), "files": files,
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
