"""Serving benchmark: a fixed load against `keras-llama serve` (in this process, on 127.0.0.1),
and against llama.cpp's ``llama-server`` when ``--llama-server PATH`` is given (same GGUF).

C concurrent clients send N chat-free completion requests (prompt of ``--prompt-tokens`` tokens,
``--output-tokens`` generated with ``ignore_eos``, temperature 0, streamed). Prints one JSON line
per server: output tokens/s, requests/s, time to first token p50/p99 and inter-token latency
p50/p99 (vLLM's definitions: ITL = gaps between streamed tokens), the idle server's RSS, and
``sequential_s`` / ``concurrent_s``: the first C requests sent one after another, then all C at
once (``concurrency_speedup`` = their ratio). With both servers, a last line holds the ratios
keras-llama / llama-server, measured in the same run.

    python benchmarks/serve.py --clients 8 --requests 16
    python benchmarks/serve.py --llama-server PATH/llama-server --llama-server-args=--no-repack

(``--no-repack``: llama.cpp's repacked CPU weights use AMX instructions that this machine's
kernel does not allow; the server dies with "Illegal instruction" without it.)
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def one_request(url, model, prompt_ids, output_tokens):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": output_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    stamps = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                chunk = json.loads(line[5:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
    return start, stamps


def run_load(url, model, prompts, clients, output_tokens):
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(url, model, p, output_tokens), prompts))
    elapsed = time.perf_counter() - started
    ttft = [stamps[0] - start for start, stamps in results if stamps]
    itl = [b - a for _, stamps in results for a, b in zip(stamps, stamps[1:])]
    tokens = len(prompts) * output_tokens
    return {
        "clients": clients,
        "requests": len(prompts),
        "seconds": round(elapsed, 2),
        "output_tok_s": round(tokens / elapsed, 1),
        "requests_s": round(len(prompts) / elapsed, 3),
        "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3),
        "ttft_p99_s": round(float(np.percentile(ttft, 99)), 3),
        "itl_p50_ms": round(1000 * float(np.percentile(itl, 50)), 1) if itl else None,
        "itl_p99_ms": round(1000 * float(np.percentile(itl, 99)), 1) if itl else None,
    }


def measure(url, model, prompts, args, rss_pid=None):
    """Warm-up, idle RSS, the load, then the first C requests sequentially and concurrently."""
    run_load(url, model, prompts[:2], min(2, args.clients), 8)  # warm-up (compilation)
    idle = rss_mb(rss_pid)
    result = run_load(url, model, prompts, args.clients, args.output_tokens)
    same = prompts[: args.clients]
    sequential = run_load(url, model, same, 1, args.output_tokens)["seconds"]
    concurrent = run_load(url, model, same, args.clients, args.output_tokens)["seconds"]
    return {"idle_rss_mb": idle, **result, "sequential_s": sequential,
            "concurrent_s": concurrent,
            "concurrency_speedup": round(sequential / concurrent, 2)}  # fmt: skip


def rss_mb(pid=None):
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024)
    return None


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url, timeout=900, process=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            with open(log) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"the server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2_135m_instruct")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--llama-server", default=None, help="path of a llama-server binary")
    parser.add_argument("--llama-server-args", default="",
                        help="extra llama-server arguments, e.g. '--no-repack'")  # fmt: skip
    args = parser.parse_args()

    from keras_llama.models import CausalLM
    from keras_llama.serving import create_app
    from tests.serving.conftest import serve

    causal_lm = CausalLM.from_preset(args.preset)
    vocabulary = causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocabulary - 100, args.prompt_tokens).tolist()
               for _ in range(args.requests)]  # fmt: skip
    app = create_app(causal_lm, model_name="bench", max_batch_size=args.max_batch_size,
                     max_model_len=args.prompt_tokens + args.output_tokens + 16)  # fmt: skip
    with serve(app, timeout=900) as url:
        ours = measure(url, "bench", prompts, args)
    print(json.dumps({"server": "keras-llama", **ours}), flush=True)

    if args.llama_server:
        from keras_llama.models.llama3.llama3_presets import backbone_presets
        from keras_llama.presets import handles

        gguf = handles.resolve(backbone_presets[args.preset]["kaggle_handle"])
        port = free_port()
        log = os.path.join(tempfile.gettempdir(), f"llama-server-{port}.log")
        log_file = open(log, "w")  # noqa: SIM115 - closed after the server stops
        proc = subprocess.Popen([args.llama_server, "-m", gguf, "--host", "127.0.0.1", "--port",
                                 str(port), "-np", str(args.max_batch_size), "-t", "2", "-c",
                                 str(args.max_batch_size * (args.prompt_tokens + args.output_tokens + 16)),
                                 *args.llama_server_args.split()],
                                stdout=subprocess.DEVNULL, stderr=log_file)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, process=proc, log=log)
            theirs = measure(url, "bench", prompts, args, rss_pid=proc.pid)
            print(json.dumps({"server": "llama-server", **theirs}), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log_file.close()
        keys = ("output_tok_s", "ttft_p50_s", "itl_p50_ms", "idle_rss_mb", "concurrency_speedup")
        print(json.dumps({"ratio": "keras-llama / llama-server",
                          **{k: round(ours[k] / theirs[k], 3) for k in keys if theirs[k]}}))  # fmt: skip


if __name__ == "__main__":
    main()
