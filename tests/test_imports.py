"""Import rules: no TensorFlow, and imports flow utils -> tokenizers/samplers/presets -> models -> cli."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keras_llama"

# A subpackage may import only the subpackages listed for it (besides itself).
ALLOWED = {
    "utils": set(),
    "tokenizers": {"utils", "version"},
    "samplers": {"utils", "version"},
    # gguf_blocks.py gives layers kept as GGUF stores them their `BlockDTypePolicy`.
    "presets": {"utils", "tokenizers", "quantization", "version"},
    # packing.py reads Keras layers' quantization (keras_llama.quantization imports nothing).
    "kernels": {"utils", "quantization", "version"},
}


def _imported_subpackages(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "keras_llama" and len(parts) > 1:
                yield parts[1]


def test_imports_flow_one_way():
    violations = []
    for sub, allowed in ALLOWED.items():
        for path in (PACKAGE / sub).rglob("*.py"):
            for imported in _imported_subpackages(path):
                if imported != sub and imported not in allowed:
                    violations.append(f"{path.relative_to(PACKAGE)} imports keras_llama.{imported}")
    assert not violations, violations


def test_package_imports_without_tensorflow():
    code = (
        "import sys, keras_llama, keras_llama.models, keras_llama.samplers, keras_llama.tokenizers;"
        "bad = [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
