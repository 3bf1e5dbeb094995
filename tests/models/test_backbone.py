"""LlamaBackbone / layers: config round trips, weight-file layout, input validation."""

import inspect

import h5py
import keras
import numpy as np
import pytest

from keras_llama.models import Llama3Backbone, Llama3CausalLM, LlamaBackbone, LlamaCausalLM
from keras_llama.models.llama.llama_attention import LlamaAttention
from keras_llama.models.llama.llama_decoder import LlamaTransformerDecoder
from keras_llama.models.llama.llama_layers import LlamaLayerNorm, LlamaRotaryEmbedding

TINY = dict(
    vocabulary_size=100,
    num_layers=2,
    num_query_heads=4,
    hidden_dim=32,
    intermediate_dim=64,
    num_key_value_heads=2,
)
BASE_LAYER_KEYS = {"name", "trainable", "dtype"}


def _init_params(cls):
    params = inspect.signature(cls.__init__).parameters
    return {n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD}


def _inputs(batch=2, length=5):
    ids = np.arange(batch * length, dtype="int32").reshape(batch, length) % 100
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


@pytest.mark.parametrize(
    "layer",
    [
        LlamaLayerNorm(epsilon=1e-5),
        LlamaRotaryEmbedding(
            max_wavelength=500000,
            scaling_factor=2.0,
            frequency_adjustment_factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            pretraining_sequence_length=8192,
        ),
        LlamaAttention(
            num_query_heads=4, num_key_value_heads=2, rope_scaling_factor=2.0, dropout=0.1
        ),
        LlamaTransformerDecoder(
            intermediate_dim=64, num_query_heads=4, num_key_value_heads=2, layer_norm_epsilon=1e-5
        ),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_layer_config_keys_equal_init_params_and_round_trip(layer):
    config = layer.get_config()
    assert set(config) - BASE_LAYER_KEYS == _init_params(type(layer))
    clone = type(layer).from_config(config)
    assert clone.get_config() == config


@pytest.mark.parametrize("cls", [LlamaBackbone, Llama3Backbone])
def test_backbone_config_keys_equal_init_params_and_round_trip(cls):
    backbone = cls(**TINY, tie_word_embeddings=True, rope_position_scaling_factor=2.0)
    config = backbone.get_config()
    assert set(config) - {"name", "trainable"} == _init_params(cls)
    assert config["tie_word_embeddings"] is True  # KerasHub dropped this one
    clone = cls.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(clone(_inputs())),
        keras.ops.convert_to_numpy(backbone(_inputs())),
    )


@pytest.mark.parametrize(
    "task_cls,backbone_cls", [(LlamaCausalLM, LlamaBackbone), (Llama3CausalLM, Llama3Backbone)]
)
def test_causal_lm_config_round_trip(task_cls, backbone_cls):
    lm = task_cls(backbone_cls(**TINY))
    config = lm.get_config()
    assert _init_params(task_cls) <= set(config)
    clone = task_cls.from_config(config)
    assert type(clone.backbone) is backbone_cls
    assert clone.backbone.get_config() == lm.backbone.get_config()


def test_keras_save_and_load_model(tmp_path):
    lm = LlamaCausalLM(LlamaBackbone(**TINY))
    path = tmp_path / "model.keras"
    lm.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored(_inputs())),
        keras.ops.convert_to_numpy(lm(_inputs())),
        atol=1e-6,
    )


# Paths of a KerasHub 0.32 `LlamaBackbone.save_weights()` file for this config, read off a file
# written by keras-hub itself: the same layout lets KerasHub weight files load as they are.
KERASHUB_H5_PATHS = ["layers/llama_layer_norm/vars/0"] + [
    f"layers/llama_transformer_decoder{suffix}/{path}/vars/0"
    for suffix in ("", "_1")
    for path in (
        "_feedforward_gate_dense",
        "_feedforward_intermediate_dense",
        "_feedforward_layernorm",
        "_feedforward_output_dense",
        "_self_attention_layer/_key_dense",
        "_self_attention_layer/_output_dense",
        "_self_attention_layer/_query_dense",
        "_self_attention_layer/_value_dense",
        "_self_attention_layernorm",
    )
]


@pytest.mark.parametrize("tie", [False, True])
def test_weight_file_paths_are_kerashubs(tmp_path, tie):
    backbone = LlamaBackbone(**TINY, tie_word_embeddings=tie)
    path = tmp_path / "model.weights.h5"
    backbone.save_weights(path)
    found = {}
    with h5py.File(path) as f:
        f.visititems(
            lambda n, o: found.__setitem__(n, o.shape) if isinstance(o, h5py.Dataset) else None
        )
    expected = set(KERASHUB_H5_PATHS) | {"layers/reversible_embedding/vars/0"}
    if not tie:
        expected.add("layers/reversible_embedding/vars/1")
    assert set(found) == expected
    assert found["layers/reversible_embedding/vars/0"] == (100, 32)
    assert found["layers/llama_transformer_decoder/_self_attention_layer/_query_dense/vars/0"] == (
        32,
        4,
        8,
    )


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(hidden_dim=30), "hidden_dim=30, num_query_heads=4"),
        (dict(num_key_value_heads=3), "num_query_heads=4, num_key_value_heads=3"),
        (dict(num_layers=0), "num_layers=0"),
        (dict(vocabulary_size=-5), "vocabulary_size=-5"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(rope_frequency_adjustment_factor=8.0), "low_freq_factor"),
        (dict(rope_position_scaling_factor=0.0), "scaling_factor=0.0"),
    ],
)
def test_bad_config_gets_clear_error(kwargs, fragment):
    with pytest.raises(ValueError, match="Received") as info:
        LlamaBackbone(**{**TINY, **kwargs})
    assert fragment in str(info.value)


def test_layout_map_rejects_non_mesh():
    with pytest.raises(ValueError, match="device_mesh"):
        LlamaBackbone.get_layout_map("not a mesh")


@pytest.mark.parametrize("bad_id", [-1, TINY["vocabulary_size"]])
def test_token_ids_outside_the_vocabulary_are_refused(bad_id):
    """The embedding gather would clamp them silently; eager calls name the id and the size."""
    backbone = LlamaBackbone(**TINY)
    causal_lm = LlamaCausalLM(backbone)
    x = _inputs()
    x["token_ids"][1, 3] = bad_id
    message = rf"vocabulary of size 100\. Received: token id {bad_id}\b"
    with pytest.raises(ValueError, match=message):
        backbone(x)
    with pytest.raises(ValueError, match=message):
        causal_lm(x)
    with pytest.raises(ValueError, match=message):
        causal_lm.score(x["token_ids"], x["padding_mask"])
    with pytest.raises(ValueError, match=message):
        causal_lm.score(_inputs()["token_ids"], scoring_mode="loss", target_ids=x["token_ids"])
    # Padding positions too: every id reaches the gather. In-range ids pass.
    x["padding_mask"][1, 3:] = 0
    with pytest.raises(ValueError, match=message):
        backbone(x)
    x["token_ids"][1, 3] = 0
    assert backbone(x).shape == (2, 5, TINY["hidden_dim"])
    assert causal_lm.score(x["token_ids"], x["padding_mask"]).shape == (2, 5, 100)
