"""Load time of a preset: ``CausalLM.from_preset(preset)`` in a fresh process, warm cache.

Prints one JSON line per run. Each run is a new Python process (so imports and first-call
costs count as a user sees them); the checkpoint is already in the cache and the OS page cache
(one untimed load first), so no download is timed.

    python benchmarks/load.py                                   # smollm2_135m_instruct, 3 runs
    python benchmarks/load.py --preset ./my_preset --runs 5
    PYTHONPATH=/path/to/old/checkout python benchmarks/load.py  # another version, same machine

Fields: ``import_s`` (``import keras_llama``), ``open_s`` (reading the checkpoint's metadata:
config, tokenizer, tensor index), ``backbone_s`` (building the backbone and loading its
weights), ``tokenizer_s`` (building the preprocessor and tokenizer), ``load_s`` (the whole
``CausalLM.from_preset``, timed on its own: the three stages above run again inside it),
``total_s`` (import + load), ``peak_rss_mb``. Stages are timed in a separate process from
``load_s`` so that they do not warm each other.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_PRESET = "smollm2_135m_instruct"


def _child(preset, stages):
    start = time.perf_counter()
    os.environ.setdefault("KERAS_BACKEND", "jax")  # as `import keras_llama` does
    import keras

    import keras_llama
    from keras_llama.models import CausalLM

    result = {"import_s": time.perf_counter() - start}
    if stages:
        from keras_llama.models import Backbone, preset_loading, preset_reading

        start = time.perf_counter()
        src = preset_reading.open_preset(preset)
        result["open_s"] = time.perf_counter() - start
        start = time.perf_counter()
        Backbone.from_preset(src)
        result["backbone_s"] = time.perf_counter() - start
        task_cls = preset_reading.pick_class(CausalLM, src, "task")
        start = time.perf_counter()
        preset_loading.load_preprocessor(task_cls.preprocessor_cls, src)
        result["tokenizer_s"] = time.perf_counter() - start
    else:
        start = time.perf_counter()
        CausalLM.from_preset(preset)
        result["load_s"] = time.perf_counter() - start
        result["total_s"] = result["import_s"] + result["load_s"]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["keras_llama_version"] = keras_llama.__version__
    result["keras_llama_path"] = os.path.dirname(keras_llama.__file__)
    result["backend"] = keras.config.backend()
    print(json.dumps(result))


def _run(preset, stages):
    command = [sys.executable, __file__, "--child", "--preset", preset]
    if stages:
        command.append("--stages")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--label", default="", help="a free-form tag copied into each line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.preset, args.stages)
        return
    _run(args.preset, stages=False)  # fill the caches (download, page cache); not reported
    for run in range(args.runs):
        line = {"benchmark": "load", "preset": args.preset, "run": run, "label": args.label}
        line.update(_run(args.preset, stages=True))
        stages = {k: line[k] for k in ("open_s", "backbone_s", "tokenizer_s")}
        line.update(_run(args.preset, stages=False))
        line.update(stages)
        line["cpu_count"] = os.cpu_count()
        line["load_average_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
