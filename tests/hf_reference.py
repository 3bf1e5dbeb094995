"""Random Hugging Face reference models for parity tests (transformers is the reference)."""

import numpy as np

TINY = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    rms_norm_eps=1e-5,
)

# name -> extra LlamaConfig kwargs
CONFIGS = {
    "llama2_mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2, rope_theta=500000.0),
    "llama31_rope": dict(
        num_key_value_heads=2,
        rope_theta=500000.0,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "linear_scaling": dict(num_key_value_heads=2, rope_scaling={"type": "linear", "factor": 4.0}),
}


def make_hf_model(name, seed=0, **overrides):
    """A float32 `LlamaForCausalLM` with random weights large enough to give varied logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = {**TINY, **CONFIGS[name], **overrides}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval().float()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm scales: not all ones, so a wrong norm shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, token_ids, attention_mask=None):
    import torch

    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)
        mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def to_keras_llama(model, **backbone_kwargs):
    """Our LlamaCausalLM with the weights of a Hugging Face model (via the HF converter)."""
    from keras_llama.models import LlamaBackbone, LlamaCausalLM
    from keras_llama.models.weights import assign_weights
    from keras_llama.presets import huggingface

    config = huggingface.convert_backbone_config(model.config.to_dict())
    config.update(backbone_kwargs)
    backbone = LlamaBackbone(**config)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    assign_weights(backbone, huggingface.convert_weights(state.__getitem__, config))
    return LlamaCausalLM(backbone)
