"""LoRA adapter files move between KerasHub and keras-llama.

The reference is a file KerasHub 0.32 itself wrote (``tests/data/keras_hub/llama_adapter.lora.h5``,
rank 2 on KerasHub's default targets, random factors; ``scripts/make_test_presets.py``) and
KerasHub's logits with it loaded (``expected.npz``, ``llama_lora_logits``). KerasHub loading a file
*we* wrote is checked by comparing our file with KerasHub's entry by entry: the same HDF5 paths,
shapes, dtypes and values, which is all KerasHub's ``load_lora_weights`` reads.
"""

import os
import stat

import h5py
import numpy as np
import pytest

from keras_llama.models import CausalLM
from tests.presets.helpers import KERAS_HUB

THEIRS = os.path.join(KERAS_HUB, "llama_adapter.lora.h5")


def _logits(causal_lm, expected):
    from keras.ops import convert_to_numpy

    x = {"token_ids": expected["token_ids"], "padding_mask": expected["padding_mask"]}
    return convert_to_numpy(causal_lm(x))


def _entries(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return out


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(os.path.join(KERAS_HUB, "expected.npz")))


def test_keras_hub_adapter_file_gives_keras_hubs_logits(expected):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    causal_lm.backbone.load_lora_weights(THEIRS)
    mask = expected["padding_mask"].astype(bool)
    ours = _logits(causal_lm, expected)
    np.testing.assert_allclose(ours[mask], expected["llama_lora_logits"][mask], atol=1e-5, rtol=0)
    # The adapters moved the logits (the test would pass vacuously on zero factors otherwise).
    assert np.abs(expected["llama_lora_logits"] - expected["llama_logits"])[mask].max() > 0.1
    enabled = sorted(causal_lm.backbone._lora_layer_paths)
    assert enabled == [
        f"transformer_layer_{i}/self_attention/{name}"
        for i in (0, 1)
        for name in ("query", "value")
    ]


def test_our_adapter_file_is_keras_hubs_layout(tmp_path):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    causal_lm.backbone.load_lora_weights(THEIRS)
    ours = tmp_path / "again.lora.h5"
    causal_lm.backbone.save_lora_weights(ours)
    theirs, mine = _entries(THEIRS), _entries(ours)
    assert sorted(mine) == sorted(theirs)
    assert "lora/vars/rank" in mine and "lora/9/vars/lora_kernel_a" in mine
    for name, value in theirs.items():
        assert np.asarray(mine[name]).dtype == np.asarray(value).dtype, name
        np.testing.assert_array_equal(mine[name], value, err_msg=name)
    # The user's normal file mode (the temporary file it was renamed from is 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(ours).st_mode) == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["again.lora.h5"]


def _write(path, build):
    with h5py.File(path, "w") as f:
        build(f)
    return path


def test_bad_adapter_files_are_named_errors(tmp_path, expected):
    causal_lm = CausalLM.from_preset(os.path.join(KERAS_HUB, "llama"))
    backbone = causal_lm.backbone
    with pytest.raises(FileNotFoundError, match="no.lora.h5"):
        backbone.load_lora_weights(tmp_path / "no.lora.h5")
    junk = tmp_path / "junk.lora.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="Not a readable HDF5 file.*junk"):
        backbone.load_lora_weights(junk)
    no_rank = _write(tmp_path / "norank.lora.h5", lambda f: f.create_group("lora"))
    with pytest.raises(ValueError, match="no scalar `lora/vars/rank`"):
        backbone.load_lora_weights(no_rank)

    def adapter(index, a_shape=(32, 4, 2), b_shape=(2, 8), rank=2):
        def build(f):
            f.create_group("lora/vars")["rank"] = np.int64(rank)
            group = f.create_group(f"lora/{index}/vars")
            group["lora_kernel_a"] = np.zeros(a_shape, "float32")
            group["lora_kernel_b"] = np.zeros(b_shape, "float32")

        return build

    far = _write(tmp_path / "far.lora.h5", adapter(500))
    with pytest.raises(ValueError, match="layer index 500, which is no layer.*24 layers"):
        backbone.load_lora_weights(far)
    norm = _write(tmp_path / "norm.lora.h5", adapter(2))
    with pytest.raises(
        ValueError, match="'transformer_layer_0/feedforward_layernorm', which has no LoRA"
    ):
        backbone.load_lora_weights(norm)
    wrong = _write(tmp_path / "wrong.lora.h5", adapter(11, a_shape=(32, 4, 3)))
    with pytest.raises(
        ValueError, match=r"lora_kernel_a of shape \(32, 4, 3\).*expects \(32, 4, 2\)"
    ):
        backbone.load_lora_weights(wrong)
    zero = _write(tmp_path / "zero.lora.h5", adapter(11, rank=0))
    with pytest.raises(ValueError, match="positive integer. Received: 0"):
        backbone.load_lora_weights(zero)
    # None of the failures enabled LoRA or changed the model.
    assert not getattr(backbone, "_lora_layer_paths", None)
    mask = expected["padding_mask"].astype(bool)
    np.testing.assert_allclose(
        _logits(causal_lm, expected)[mask], expected["llama_logits"][mask], atol=1e-5, rtol=0
    )
