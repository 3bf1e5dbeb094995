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


def hf_gradient_layout(path, backbone):
    """The transformers parameter behind one of our variable paths, and the function that turns
    its gradient (torch layout) into our variable's layout."""
    m, u, v = backbone.hidden_dim, backbone.num_query_heads, backbone.num_key_value_heads
    h = m // u
    if path == "token_embedding/embeddings":
        return "model.embed_tokens.weight", lambda g: g
    if path == "token_embedding/reverse_embeddings":
        return "lm_head.weight", lambda g: g.T
    if path == "sequence_output_layernorm/scale":
        return "model.norm.weight", lambda g: g
    layer, rest = path.split("/", 1)
    prefix = f"model.layers.{int(layer.rsplit('_', 1)[1])}."
    table = {
        "self_attention/query/kernel": ("self_attn.q_proj", lambda g: g.T.reshape(m, u, h)),
        "self_attention/key/kernel": ("self_attn.k_proj", lambda g: g.T.reshape(m, v, h)),
        "self_attention/value/kernel": ("self_attn.v_proj", lambda g: g.T.reshape(m, v, h)),
        "self_attention/attention_output/kernel": (
            "self_attn.o_proj",
            lambda g: g.T.reshape(u, h, m),
        ),
        "feedforward_gate_dense/kernel": ("mlp.gate_proj", lambda g: g.T),
        "feedforward_intermediate_dense/kernel": ("mlp.up_proj", lambda g: g.T),
        "feedforward_output_dense/kernel": ("mlp.down_proj", lambda g: g.T),
        "self_attention_layernorm/scale": ("input_layernorm", lambda g: g),
        "feedforward_layernorm/scale": ("post_attention_layernorm", lambda g: g),
    }
    name, layout = table[rest]
    return prefix + name + ".weight", layout


def hf_loss_and_gradients(model, causal_lm, token_ids, padding_mask, scored):
    """transformers' loss (``labels=``) and the gradient of every parameter (torch autograd),
    in our variables' layouts by path. ``scored`` [b, L - 1]: whether position t's prediction
    of token t + 1 counts (transformers shifts the labels itself: labels[:, t + 1] scores t)."""
    import torch

    labels = np.full(token_ids.shape, -100)
    labels[:, 1:] = np.where(scored, token_ids[:, 1:], -100)
    model.zero_grad()
    out = model(
        input_ids=torch.as_tensor(token_ids).long(),
        attention_mask=torch.as_tensor(padding_mask),
        labels=torch.as_tensor(labels).long(),
    )
    out.loss.backward()
    grads = {name: p.grad.numpy().astype(np.float64) for name, p in model.named_parameters()}
    model.zero_grad()
    reference = {}
    for v in causal_lm.trainable_variables:
        name, layout = hf_gradient_layout(v.path, causal_lm.backbone)
        reference[v.path] = layout(grads[name])
    return out.loss.item(), reference
