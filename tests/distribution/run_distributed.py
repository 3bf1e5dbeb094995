"""Run on 8 simulated CPU devices (in its own process: XLA reads the flag at start-up) and print
one line ``RESULT{json}`` for `test_distribution.py`: single-device logits and losses, the same
under ModelParallel (with each weight's sharding) and DataParallel, and the error for a mesh
whose model axis does not divide the weights."""

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_llama.models import LlamaBackbone, LlamaCausalLM  # noqa: E402

CONFIG = dict(vocabulary_size=128, num_layers=2, num_query_heads=8, hidden_dim=64,
              intermediate_dim=128, num_key_value_heads=4)  # fmt: skip


def make():
    causal_lm = LlamaCausalLM(LlamaBackbone(**CONFIG))
    causal_lm.compile(optimizer=keras.optimizers.SGD(0.1))
    return causal_lm


def fit(causal_lm, x, y, w):
    history = causal_lm.fit(x, y, sample_weight=w, batch_size=8, epochs=2, verbose=0,
                            shuffle=False)  # fmt: skip
    return history.history["loss"]


def main():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (8, 12)).astype("int32")
    mask = np.ones_like(ids)
    mask[4:, 9:] = 0  # half the rows right-padded
    x = {"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}
    y, w = ids[:, 1:], mask[:, 1:]

    keras.utils.set_random_seed(0)
    single = make()
    weights = single.get_weights()
    out = {"single_logits": single.predict_on_batch(x).tolist(), "single_losses": None}
    out["single_losses"] = fit(single, x, y, w)

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices=devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=LlamaBackbone.get_layout_map(mesh), batch_dim_name="batch"
    )
    with model_parallel.scope():
        causal_lm = make()
        causal_lm.set_weights(weights)
        out["specs"] = {
            v.path: [None if a is None else str(a) for a in v.value.sharding.spec]
            for v in causal_lm.weights
        }
        out["shard_shapes"] = {
            v.path: list(v.value.addressable_shards[0].data.shape) for v in causal_lm.weights
        }
        out["model_parallel_logits"] = causal_lm.predict_on_batch(x).tolist()
        out["model_parallel_losses"] = fit(causal_lm, x, y, w)

    with keras.distribution.DataParallel(devices=devices).scope():
        causal_lm = make()
        causal_lm.set_weights(weights)
        out["data_parallel_losses"] = fit(causal_lm, x, y, w)

    # 8-way model axis: num_key_value_heads=4 cannot be split 8 ways.
    mesh = keras.distribution.DeviceMesh((1, 8), ["batch", "model"], devices=devices)
    bad = keras.distribution.ModelParallel(
        layout_map=LlamaBackbone.get_layout_map(mesh), batch_dim_name="batch"
    )
    try:
        with bad.scope():
            make()
        out["bad_mesh_error"] = None
    except Exception as e:
        out["bad_mesh_error"] = f"{type(e).__name__}: {e}"
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
