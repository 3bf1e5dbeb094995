"""No import cycle inside keras_llama, counting every import (lazy ones inside functions too),
and presets/ never imports models/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "keras_llama"


def _modules():
    """``{dotted module name: path}`` for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("keras_llama",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported_names(module, path, node):
    """The dotted names an import statement may load (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module
    if node.level:
        package = module.split(".")
        if path.name != "__init__.py":
            package = package[:-1]  # a module's level-1 package is its parent
        base = ".".join(package[: len(package) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module
    # `from a.b import c` loads a.b, and a.b.c when c is a submodule.
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph():
    """``{module: {modules it imports}}``; a package's own ``__init__`` is no edge (Python runs
    it before any of its submodules, whoever imports them)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(module, path, node):
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def find_cycle(graph):
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state = {}  # module -> "visiting" | "done"
    stack = []

    def visit(module):
        state[module] = "visiting"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "visiting":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["keras_llama.utils.registry"].add("keras_llama.models.backbone")
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert "keras_llama.utils.registry" in cycle and "keras_llama.models.backbone" in cycle


def test_lazy_and_relative_imports_count(tmp_path):
    source = "def f():\n    from .b import g\n"
    node = ast.parse(source).body[0].body[0]
    path = tmp_path / "a.py"
    assert _imported_names("keras_llama.x.a", path, node)[0] == "keras_llama.x.b"
    node = ast.parse("from .. import models\n").body[0]
    assert _imported_names("keras_llama.x.a", path, node) == [
        "keras_llama",
        "keras_llama.models",
    ]


def test_presets_never_import_models():
    graph = import_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.startswith("keras_llama.presets")
        for target in targets
        if target.startswith("keras_llama.models")
    )
    assert not wrong, wrong


def test_base_classes_and_loaders_never_import_concrete_classes():
    graph = import_graph()
    concrete = ("keras_llama.models.llama.", "keras_llama.models.llama3.")
    readers = [
        "keras_llama.models.backbone",
        "keras_llama.models.task",
        "keras_llama.models.causal_lm",
        "keras_llama.models.preprocessor",
        "keras_llama.models.preset_reading",
        "keras_llama.models.preset_loading",
        "keras_llama.models.preset_saving",
        "keras_llama.models.tokenizer_loading",
        "keras_llama.tokenizers.tokenizer",
        "keras_llama.utils.registry",
    ]
    wrong = sorted(
        f"{module} imports {target}"
        for module in readers
        for target in graph[module]
        if target.startswith(concrete)
    )
    assert not wrong, wrong
