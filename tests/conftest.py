import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _torch_exclusions():
    """What this backend's run leaves out (`tests/torch_suite.py`: ``EXCLUDED`` on torch,
    ``TORCH_ONLY`` on JAX), each with its reason: deselected, never skipped."""
    from tests.torch_suite import EXCLUDED, TORCH_ONLY

    return EXCLUDED if os.environ.get("KERAS_BACKEND") == "torch" else TORCH_ONLY


def pytest_ignore_collect(collection_path, config):
    """On the torch backend, leave out the files `tests/torch_suite.py` names (with reasons)."""
    excluded = _torch_exclusions()
    if not excluded:
        return None
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    try:
        relative = Path(collection_path).resolve().relative_to(root).as_posix()
    except ValueError:
        return None
    return True if relative in excluded else None


def pytest_collection_modifyitems(config, items):
    """Deselect the single tests `tests/torch_suite.py` names for this backend."""
    excluded = _torch_exclusions()
    if not excluded:
        return
    kept = [item for item in items
            if item.nodeid not in excluded and item.nodeid.split("[")[0] not in excluded]  # fmt: skip
    deselected = [item for item in items if item not in kept]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
