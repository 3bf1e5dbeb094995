"""Rejecting crafted files (issue 14): time and peak memory above the process's baseline.

Each crafted file of `tests.presets.crafted` is loaded with ``Backbone.from_preset`` in a fresh
subprocess; it must raise ValueError or FileNotFoundError. One JSON line per file:
``{"file", "error", "seconds", "peak_rss_above_baseline_mb"}``: the peak RSS while rejecting the
file minus the RSS before it, measured after the imports and one trivial rejection (which loads
what is imported lazily); the peak, ``VmHWM``, is reset there through ``/proc/self/clear_refs``
(Linux only).

    python benchmarks/rejections.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
from keras_llama.models import Backbone
def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
# Lazily imported modules (JAX's numpy, the loaders) are imported by a first, trivial
# rejection, so that the baseline holds them and the peak measures the crafted file alone.
try:
    Backbone.from_preset(sys.argv[1] + ".does-not-exist")
except (ValueError, FileNotFoundError):
    pass
baseline = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS (Linux)
start = time.perf_counter()
try:
    Backbone.from_preset(sys.argv[1])
    error = None
except (ValueError, FileNotFoundError) as e:
    error = f"{type(e).__name__}: {e}"[:160]
seconds = time.perf_counter() - start
peak = status_mb("VmHWM")
print(json.dumps({"error": error, "seconds": round(seconds, 3),
                  "peak_rss_above_baseline_mb": round(max(peak - baseline, 0.0), 1)}))
"""


def main():
    sys.path.insert(0, str(ROOT))
    from tests.presets import crafted

    env = {**os.environ, "PYTHONPATH": str(ROOT), "KERAS_BACKEND": "jax"}
    with tempfile.TemporaryDirectory() as folder:
        for name, (path, _) in crafted.crafted_files(folder).items():
            result = subprocess.run(
                [sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env,
                timeout=300,
            )  # fmt: skip
            line = result.stdout.strip().splitlines()
            record = json.loads(line[-1]) if line else {"crash": result.stderr[-300:]}
            print(json.dumps({"file": name, **record}), flush=True)


if __name__ == "__main__":
    main()
