import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_ignore_collect(collection_path, config):
    """On the torch backend, leave out the files `tests/torch_suite.py` names (with reasons)."""
    if os.environ.get("KERAS_BACKEND") != "torch":
        return None
    from pathlib import Path

    from tests.torch_suite import EXCLUDED

    root = Path(__file__).resolve().parents[1]
    try:
        relative = Path(collection_path).resolve().relative_to(root).as_posix()
    except ValueError:
        return None
    return True if relative in EXCLUDED else None
