"""Issue 14, item 4: a save killed mid-way leaves the old preset intact and its staging folder is
removed by the next save to that place; saved presets get the user's usual file modes."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from keras_llama.models import LlamaBackbone
from keras_llama.presets import keras_format

ARGS = (16, 1, 2, 8, 16, 1)  # vocabulary, layers, heads, hidden, intermediate, kv heads

KILLED_SAVE = """
import sys, time
from keras_llama.presets import keras_format
with keras_format.atomic_preset(sys.argv[1]) as writer:
    with open(writer.path("model.weights.h5"), "wb") as f:
        f.write(b"x" * 1000)
    print("staged", flush=True)
    time.sleep(120)
"""


def _hidden(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def test_a_killed_save_is_cleaned_up_by_the_next_save(tmp_path):
    target = str(tmp_path / "preset")
    LlamaBackbone(*ARGS).save_to_preset(target)
    before = sorted(os.listdir(target))
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, target], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "staged"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    leftovers = _hidden(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].startswith(".preset.saving-")
    assert sorted(os.listdir(target)) == before  # the old preset is intact
    LlamaBackbone(*ARGS).save_to_preset(target)
    assert _hidden(tmp_path) == []


def test_a_save_in_progress_elsewhere_keeps_its_folder(tmp_path):
    live = tmp_path / f".preset.saving-{os.getppid()}-abc"  # pytest's parent: alive
    legacy = tmp_path / ".preset.saving-q1w2e3"  # an older version's name: no PID
    other = tmp_path / ".other.saving-1-abc"  # another preset's
    for folder in (live, legacy, other):
        folder.mkdir()
    LlamaBackbone(*ARGS).save_to_preset(str(tmp_path / "preset"))
    assert _hidden(tmp_path) == sorted(p.name for p in (live, legacy, other))
    day_ago = time.time() - keras_format.STALE_AFTER_S - 60
    os.utime(legacy, (day_ago, day_ago))
    LlamaBackbone(*ARGS).save_to_preset(str(tmp_path / "preset"))
    assert _hidden(tmp_path) == sorted(p.name for p in (live, other))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_presets_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        target = tmp_path / "preset"
        LlamaBackbone(*ARGS).save_to_preset(str(target))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask
    config = target / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o666 & ~umask
