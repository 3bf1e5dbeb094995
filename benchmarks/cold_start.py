"""Cold start of the README's main command, with caches filled: wall time and peak RSS of

    keras-llama generate "What is the capital of France?"

in a fresh process per run (one untimed run first fills the caches: the checkpoint, the native
kernels, the compiled programs), median of ``--runs``; and, in the same run as the anchor,
llama.cpp (llama-cpp-python, 2 threads) answering the same chat prompt (rendered by our chat
template) greedily from the same GGUF file, each run a fresh process too. One JSON line.

    python benchmarks/cold_start.py                  # 5 runs each
    python benchmarks/cold_start.py --runs 9
    python benchmarks/cold_start.py --checkout /path/to/old/checkout   # another version
    KERAS_LLAMA_EXECUTABLE_CACHE=0 python benchmarks/cold_start.py   # without the executable cache

``wall_s``: from starting the process to its exit; ``peak_rss_mb``: the process's maximum
resident set (``ru_maxrss`` of the finished child). ``answer``: the first run's output line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France?"
LLAMA_CPP = """
import sys
import llama_cpp
from llama_cpp import Llama

default = llama_cpp.llama_cpp.llama_model_default_params


def params():
    p = default()
    p.use_extra_bufts = False  # repacked CPU buffers crash on this machine (see gguf_decode.py)
    return p


llama_cpp.llama.llama_cpp.llama_model_default_params = params
llm = Llama(model_path=sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
# The chat prompt exactly as keras-llama's template renders it, special tokens parsed; as
# many new tokens as keras-llama's answer takes (this llama.cpp build does not stop on its own
# here: it answers "L'Etoile, la Cite, ..." at length from the same tokens).
tokens = llm.tokenize(sys.argv[2].encode(), add_bos=False, special=True)
out = llm(tokens, max_tokens=int(sys.argv[3]), temperature=0.0, top_k=1)
print(out["choices"][0]["text"].strip())
"""


def _run_once(command, env, cwd=None):
    """(wall seconds, peak RSS MB, stdout) of one fresh process (its own ``ru_maxrss``, from
    ``os.wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"{command[:4]} failed ({process.returncode}):\n"
                               f"{err.read().decode()[-2000:]}")  # fmt: skip
        return wall, usage.ru_maxrss / 1024, out.read().decode().strip()


def _measure(command, runs, env, cwd=None):
    _run_once(command, env, cwd)  # fills the caches (and the OS page cache)
    walls, peaks, answers = zip(*(_run_once(command, env, cwd) for _ in range(runs)))
    return walls, peaks, answers[0]


def _chat_prompt(preset):
    """The prompt ``keras-llama generate`` feeds the model: the question in the chat template."""
    from keras_llama.models import CausalLMPreprocessor

    preprocessor = CausalLMPreprocessor.from_preset(preset)
    messages = [{"role": "user", "content": PROMPT}]
    return preprocessor.apply_chat_template(messages, add_generation_prompt=True)


def _summary(walls, peaks, answer):
    return {
        "wall_s": round(statistics.median(walls), 2),
        "wall_s_runs": [round(w, 2) for w in walls],
        "peak_rss_mb": round(statistics.median(peaks)),
        "answer": answer,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--checkout", default=str(ROOT), help="the keras-llama source to time "
                        "(another version, same machine); default: this one")  # fmt: skip
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the anchor")
    parser.add_argument("--llama-cpp-tokens", type=int, default=9,
                        help="tokens llama.cpp generates (our answer: 8 and the end token)")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "jax")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.checkout, env.get("PYTHONPATH")]))
    ours = [sys.executable, "-m", "keras_llama_launcher", "generate", PROMPT,
            "--preset", args.preset]  # fmt: skip
    result = {"benchmark": "cold_start", "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": f'keras-llama generate "{PROMPT}"', "runs": args.runs,
              "checkout": args.checkout,
              "executable_cache": os.environ.get("KERAS_LLAMA_EXECUTABLE_CACHE", "1"),
              "load_average_1min": round(os.getloadavg()[0], 2)}  # fmt: skip
    # Run from the checkout: ``python -m`` puts the working folder first on sys.path.
    result["keras_llama"] = _summary(*_measure(ours, args.runs, env, cwd=args.checkout))
    try:
        if args.no_llama_cpp:
            raise ImportError("--no-llama-cpp")
        from keras_llama.models.llama3.llama3_presets import backbone_presets
        from keras_llama.presets import handles

        gguf = handles.resolve(backbone_presets[args.preset]["kaggle_handle"])
        new_tokens = str(args.llama_cpp_tokens)
        theirs = [sys.executable, "-c", LLAMA_CPP, gguf, _chat_prompt(args.preset), new_tokens]
        result["llama_cpp"] = _summary(*_measure(theirs, args.runs, env))
        result["wall_vs_llama_cpp"] = round(
            result["keras_llama"]["wall_s"] / result["llama_cpp"]["wall_s"], 2
        )
        result["rss_vs_llama_cpp"] = round(
            result["keras_llama"]["peak_rss_mb"] / result["llama_cpp"]["peak_rss_mb"], 2
        )
    except (ImportError, KeyError) as error:  # no llama-cpp-python, or not a GGUF preset
        result["llama_cpp"] = f"not measured: {error}"
    result["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
