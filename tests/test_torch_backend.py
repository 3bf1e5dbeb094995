"""The torch-backend run of the suite: what it leaves out is named, with a reason.

CI (`.ci/run`) runs the whole suite a second time with ``KERAS_BACKEND=torch``; `conftest.py`
leaves out the files of `tests/torch_suite.py`. Run it locally with
``KERAS_BACKEND=torch python -m pytest -q tests``.
"""

from pathlib import Path

from tests.torch_suite import EXCLUDED, TORCH_ONLY

ROOT = Path(__file__).resolve().parents[1]


def test_every_exclusion_names_an_existing_test_file_and_a_reason():
    for entry, reason in {**EXCLUDED, **TORCH_ONLY}.items():
        path, _, name = entry.partition("::")
        assert (ROOT / path).is_file(), path
        assert Path(path).name.startswith("test_"), path
        assert not name or f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), entry
        assert len(reason) > 10, entry


def test_every_test_folder_keeps_files_in_the_torch_run():
    folders = {p.parent for p in (ROOT / "tests").rglob("test_*.py")}
    for folder in folders:
        kept = [
            p for p in folder.glob("test_*.py") if p.relative_to(ROOT).as_posix() not in EXCLUDED
        ]
        name = folder.relative_to(ROOT).as_posix()
        assert kept or name in ("tests/kernels", "tests/distribution"), name


def test_the_backend_sensitive_files_run_on_torch():
    for path in (
        "tests/models/test_plans.py",
        "tests/models/test_torch_step.py",
        "tests/models/test_llama_parity.py",
        "tests/models/test_generate.py",
        "tests/samplers/test_samplers.py",
        "tests/presets/test_keras_presets.py",
    ):
        assert path not in EXCLUDED, path
